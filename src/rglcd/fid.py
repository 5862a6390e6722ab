"""Fréchet distance (FID) of generated images to fixed reference images, through torchmetrics, in Inception's
feature space or any other (the world judge's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .evaluate import EvalError


class FeatureExtractor(nn.Module):
    """Any function of [0, 1] images to features [N, d] as the module torchmetrics' FID takes."""

    def __init__(self, extract: Callable[[Tensor], Tensor], num_features: int):
        super().__init__()
        self.extract, self.num_features = extract, num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images)


def fit_square(images: Tensor, size: int) -> Tensor:
    """Centre-crop to a square and resize to ``size``² (antialiased bicubic): FID's common preparation of
    reference and generated images alike (as GigaGAN's and DMD2's COCO evaluations, there at 256)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", antialias=True)
    return images.clamp(0, 1)


class FrechetDistance:
    """FID through torchmetrics against fixed reference images, with Inception (``features`` = 2048; weights from
    a local file, which needs torch-fidelity) or any :class:`FeatureExtractor`, on ``device`` (a FeatureExtractor's
    model must be there too). With ``size``, references and generated images are both fitted to ``size``² first
    (:func:`fit_square`). A set scorer of :class:`rglcd.evaluate.Scorers`."""

    def __init__(
        self,
        features: int | nn.Module,
        references: Iterator[Tensor],
        inception_weights: str | Path | None = None,
        size: int | None = None,
        device: str | torch.device = "cpu",
    ):
        options = {} if isinstance(features, nn.Module) else {"feature_extractor_weights_path": inception_weights}
        # normalize: inputs are floats in [0, 1]; the real statistics survive reset() between models.
        self.fid = FrechetInceptionDistance(features, normalize=True, reset_real_features=False, **options).to(device)
        self.size = size
        count = 0
        for batch in references:
            self.fid.update(self._fit(batch.to(self.fid.device)), real=True)
            count += len(batch)
        if count < 2:
            raise EvalError(f"FID needs at least 2 reference images, got {count}")

    def _fit(self, images: Tensor) -> Tensor:
        return images if self.size is None else fit_square(images, self.size)

    def reset(self) -> None:
        self.fid.reset()

    def update(self, images: Tensor, captions: list[str], records: list[Any]) -> None:
        self.fid.update(self._fit(images), real=False)

    def compute(self) -> float:
        return float(self.fid.compute())
