"""The small training loops' skeleton (`rglcd.fitting`), on one-parameter problems solved by hand."""

import math
from collections.abc import Callable

import pytest
import torch

from rglcd.fitting import adamw_without_decay_on_gains, fit, warmup_cosine


def quadratic(start: float = 0.0, target: float = 4.0) -> tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]:
    """w and the loss (w - target)², whose gradient is 2(w - target)."""
    w = torch.nn.Parameter(torch.tensor(start))
    return w, lambda: (w - target) ** 2


def constant(optimiser: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)


def test_sgd_on_a_quadratic_halves_the_distance_each_step():
    # lr 0.25: w <- w - 0.25 · 2(w - 4) = w/2 + 2, so w runs 0, 2, 3, 3.5, 3.75: exact in float32.
    w, loss = quadratic()
    optimiser = torch.optim.SGD([w], lr=0.25)
    seen = []
    losses = fit(
        loss,
        4,
        optimiser,
        constant(optimiser),
        desc="test",
        progress=False,
        after_step=lambda step: seen.append((step, w.item())),
    )
    assert losses == [16.0, 4.0, 1.0, 0.25]  # each step's loss, before its update
    assert w.item() == 3.75
    assert seen == [(0, 2.0), (1, 3.0), (2, 3.5), (3, 3.75)]  # after_step runs after the update


def test_gradients_are_clipped_to_the_norm():
    # |gradient| = 2|w - 4| >= 3 on the way, clipped to 1: w moves by lr = 0.5 a step.
    w, loss = quadratic()
    optimiser = torch.optim.SGD([w], lr=0.5)
    losses = fit(loss, 3, optimiser, constant(optimiser), desc="test", progress=False, max_grad_norm=1.0)
    assert losses == pytest.approx([16.0, 12.25, 9.0], rel=1e-5)
    assert w.item() == pytest.approx(1.5, rel=1e-5)


def warmup_cosine_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


@pytest.mark.parametrize("steps", [10, 40])
def test_each_step_uses_the_warmup_cosine_learning_rate(steps):
    # 40 steps: a 2-step warm-up (0, 1/2), then the cosine from 1; 10 steps: at least 1 step of warm-up (lr 0).
    w, loss = quadratic()
    optimiser = torch.optim.SGD([w], lr=1.0)
    used = []

    def loss_noting_the_lr() -> torch.Tensor:
        used.append(optimiser.param_groups[0]["lr"])
        return loss()

    fit(loss_noting_the_lr, steps, optimiser, warmup_cosine(optimiser, steps), desc="test", progress=False)
    assert used == pytest.approx([warmup_cosine_factor(step, steps) for step in range(steps)], abs=1e-12)
    assert used[:3] == (
        [0.0, 0.5, 1.0] if steps == 40 else [0.0, 1.0, pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))]
    )


def test_adamw_decays_weights_but_not_gains():
    # With zero gradients AdamW's step is the decay alone: weight × (1 - lr · weight_decay); the bias keeps its value.
    layer = torch.nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(3.0)
    optimiser = adamw_without_decay_on_gains(layer, lr=0.1, weight_decay=0.5)
    fit(lambda: 0 * layer(torch.ones(1, 1)).sum(), 1, optimiser, constant(optimiser), desc="test", progress=False)
    assert layer.weight.item() == pytest.approx(2.0 * 0.95, rel=1e-6)
    assert layer.bias.item() == 3.0
