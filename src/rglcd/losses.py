"""Distances for the consistency distillation loss d(f_θ(z_{t+k}), f_θ⁻(ẑ_t)), each per sample ([B])."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DistanceKind = Literal["l2", "huber", "pseudo_huber", "cauchy"]
DISTANCE_KINDS: tuple[str, ...] = ("l2", "huber", "pseudo_huber", "cauchy")


def default_norm_c(sample_numel: int) -> float:
    """iCT's constant c = 0.00054·√d for a d-dimensional sample (Song & Dhariwal 2023, §3.3)."""
    return 0.00054 * math.sqrt(sample_numel)


@dataclass(frozen=True)
class ConsistencyDistance:
    """A per-sample distance, in the style of EDM's loss callables.

    - ``l2``: mean squared error (LCM).
    - ``huber``: mean over elements of √((x−y)² + c²) − c, c = 0.001: the loss of the RG-LCD paper and its
      official code (and of diffusers' LCD scripts).
    - ``pseudo_huber``: √(‖x−y‖² + c²) − c on the whole sample (iCT), c = 0.00054·√d by default.
    - ``cauchy``: log(1 + ‖x−y‖² / (2c²)) on the whole sample (sLCT, Dao et al. 2025), c as pseudo_huber.
    """

    kind: DistanceKind = "huber"
    c: float | None = None  # None: 0.001 for huber, 0.00054·√d for pseudo_huber/cauchy

    def __post_init__(self) -> None:
        if self.kind not in DISTANCE_KINDS:
            raise ValueError(f"unknown distance {self.kind!r}; expected one of {DISTANCE_KINDS}")
        if self.c is not None and self.c <= 0:
            raise ValueError(f"the distance constant c must be > 0, got {self.c}")

    def __call__(self, prediction: Tensor, target: Tensor) -> Tensor:
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # half precision is upcast, never down
        diff = (prediction.to(dtype) - target.to(dtype)).flatten(1)  # [B, d]
        if self.kind == "l2":
            return diff.pow(2).mean(dim=1)
        if self.kind == "huber":
            c = 0.001 if self.c is None else self.c
            return (torch.sqrt(diff.pow(2) + c**2) - c).mean(dim=1)
        c = default_norm_c(diff.shape[1]) if self.c is None else self.c
        squared_norm = diff.pow(2).sum(dim=1)
        if self.kind == "pseudo_huber":
            return torch.sqrt(squared_norm + c**2) - c
        return torch.log1p(squared_norm / (2 * c**2))
