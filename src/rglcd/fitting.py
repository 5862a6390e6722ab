"""One skeleton for the package's own small training loops: the world rewards, judge and teacher, and the LRM.

Each loop supplies the loss of a fresh batch (drawn from its own generator, so a run repeats exactly) and
:func:`fit` does the rest: gradients, optional clipping, the optimiser and schedule steps, and a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import Tensor, nn
from tqdm.auto import tqdm


def adamw_without_decay_on_gains(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that spares norms' gains, biases, class tokens and logit scales (0-d or 1-d) from weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' linear warm-up over the first 5% of ``steps`` (at least one), then a cosine decay to 0."""
    return get_cosine_schedule_with_warmup(optimiser, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)


def fit(
    batch_loss: Callable[[], Tensor],
    steps: int,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    *,
    desc: str,
    progress: bool = True,
    max_grad_norm: float | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Take ``steps`` optimiser steps on ``batch_loss()``, a fresh batch's loss each time; return each step's loss.

    A step: the loss and its gradients; their clipping to a total norm of ``max_grad_norm`` (over everything the
    optimiser trains) if given; the optimiser and schedule steps; then ``after_step(step)`` (clamps, EMA updates).
    """
    trained = [parameter for group in optimiser.param_groups for parameter in group["params"]]
    losses: list[float] = []
    for step in (bar := tqdm(range(steps), desc=desc, disable=not progress)):
        loss = batch_loss()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        optimiser.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
