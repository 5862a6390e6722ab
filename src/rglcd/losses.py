"""Distances for the consistency distillation loss d(f_θ(z_{t+k}), f_θ⁻(ẑ_t)), each per sample ([B])."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .plugins import Registry

# (x − y flattened [B, d], the constant c or None for the distance's default) -> [B]
Distance = Callable[[Tensor, float | None], Tensor]
DISTANCES: Registry[Distance] = Registry("distance")
register_distance = DISTANCES.register


def default_norm_c(sample_numel: int) -> float:
    """iCT's constant c = 0.00054·√d for a d-dimensional sample (Song & Dhariwal 2023, §3.3)."""
    return 0.00054 * math.sqrt(sample_numel)


@register_distance("l2")
def l2(diff: Tensor, c: float | None) -> Tensor:
    """Mean squared error (LCM)."""
    return diff.pow(2).mean(dim=1)


@register_distance("huber")
def huber(diff: Tensor, c: float | None) -> Tensor:
    """Mean over elements of √((x−y)² + c²) − c, c = 0.001: the loss of the RG-LCD paper and its official code (and
    of diffusers' LCD scripts)."""
    c = 0.001 if c is None else c
    return (torch.sqrt(diff.pow(2) + c**2) - c).mean(dim=1)


@register_distance("pseudo_huber")
def pseudo_huber(diff: Tensor, c: float | None) -> Tensor:
    """√(‖x−y‖² + c²) − c on the whole sample (iCT), c = 0.00054·√d by default."""
    c = default_norm_c(diff.shape[1]) if c is None else c
    return torch.sqrt(diff.pow(2).sum(dim=1) + c**2) - c


@register_distance("cauchy")
def cauchy(diff: Tensor, c: float | None) -> Tensor:
    """log(1 + ‖x−y‖² / (2c²)) on the whole sample (sLCT, Dao et al. 2025), c as pseudo_huber."""
    c = default_norm_c(diff.shape[1]) if c is None else c
    return torch.log1p(diff.pow(2).sum(dim=1) / (2 * c**2))


@dataclass(frozen=True)
class ConsistencyDistance:
    """A per-sample distance by name (:data:`DISTANCES`: l2, huber, pseudo_huber, cauchy, or a plugin's), in the
    style of EDM's loss callables. ``c``: None for the distance's default."""

    kind: str = "huber"
    c: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DISTANCES:
            raise ValueError(f"unknown distance {self.kind!r}; expected one of {tuple(DISTANCES.names())}")
        if self.c is not None and self.c <= 0:
            raise ValueError(f"the distance constant c must be > 0, got {self.c}")

    def __call__(self, prediction: Tensor, target: Tensor) -> Tensor:
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # half precision is upcast, never down
        diff = (prediction.to(dtype) - target.to(dtype)).flatten(1)  # [B, d]
        return DISTANCES[self.kind](diff, self.c)
