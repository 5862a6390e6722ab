"""Pure image metrics (no I/O, no models)."""

from __future__ import annotations

import torch
from torch import Tensor


def high_frequency_share(images: Tensor, cutoff: float = 0.25) -> Tensor:
    """Share [N] of each image's spectral energy above ``cutoff`` cycles per pixel (0.25 = half Nyquist).

    ``images`` [N, C, H, W]; each channel's mean is removed first, so a flat image has no energy (share 0).
    A frequency counts as high when its larger axis component exceeds the cutoff: white noise puts about 72%
    of its energy there (on a 32² grid), smooth renders almost none. Reward over-optimisation shows up as
    high-frequency patterns, so the ratio of a model's share to the teacher's is an over-optimisation monitor.
    """
    centred = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs() ** 2  # [N, C, H, W]
    fy = torch.fft.fftfreq(images.shape[-2], device=images.device).abs()
    fx = torch.fft.fftfreq(images.shape[-1], device=images.device).abs()
    high = torch.maximum(fy[:, None], fx[None, :]) > cutoff  # [H, W]
    total = power.sum(dim=(1, 2, 3))
    return power[..., high].sum(dim=(1, 2)) / total.clamp(min=1e-12)
