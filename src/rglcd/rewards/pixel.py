"""Rewards computed directly on pixels (no learned weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import RewardModel, register_reward


@register_reward("colorfulness")
class Colorfulness(RewardModel):
    """Hasler & Süsstrunk's colourfulness M = σ_rgyb + 0.3·μ_rgyb (2003), on [0, 1] pixels.

    A hackable "aesthetic": maximising it alone saturates colours regardless of the prompt.
    """

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        red, green, blue = images.float().unbind(dim=1)  # each [B, H, W]
        rg = (red - green).flatten(1)
        yb = (0.5 * (red + green) - blue).flatten(1)
        eps = 1e-8  # keeps the square roots differentiable on flat images
        spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + eps)
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + eps)
        return spread + 0.3 * mean
