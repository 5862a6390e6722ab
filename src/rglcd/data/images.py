"""Image decoding and the training transform, with PIL and torch only (no torchvision)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(image: bytes | Path) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later), honour EXIF rotation, convert to RGB."""
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def to_training_tensor(
    image: Image.Image, resolution: int, *, crop_at: tuple[float, float] | None, flip: bool
) -> torch.Tensor:
    """Square ``[3, resolution, resolution]`` float tensor in [-1, 1].

    The shorter side is resized to ``resolution`` (PIL's bilinear filter widens with the scale, i.e. it
    antialiases), then a square is cropped: centred when ``crop_at`` is None, else at ``crop_at = (u, v)`` in
    [0, 1)², the fractions of the horizontal and vertical slack. ``flip`` mirrors it left to right.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    slack_x, slack_y = size[0] - resolution, size[1] - resolution
    if crop_at is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left, top = int(crop_at[0] * (slack_x + 1)), int(crop_at[1] * (slack_y + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # [H, W, 3] in 0..255
    return pixels.permute(2, 0, 1) / 127.5 - 1.0
