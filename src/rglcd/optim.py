"""Optimiser set-ups shared by the package's own small training loops (world rewards, the latent proxy RM)."""

from __future__ import annotations

import math

import torch
from torch import nn


def adamw_without_decay_on_gains(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that spares norms' gains, biases, class tokens and logit scales (0-d or 1-d) from weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then a cosine decay to 0."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    )
