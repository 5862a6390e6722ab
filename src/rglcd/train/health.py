"""Whether training was healthy when a checkpoint was taken, so that a NaN stop names a checkpoint that recovers.

What a diverging run looks like (``optim.learning_rate=1e10`` on the tiny preset, checkpoints every step): the
step that wrecks the student has a finite loss and an ordinary gradient norm (its update is what is wrong), its
weights jump from |θ| ≈ 1 to 10⁹ and the checkpoint after it holds them; only the next step's loss is NaN. So a
checkpoint is healthy when no step since the previous one had a non-finite loss and the trained weights are finite,
their norm at most :data:`GROWTH_LIMIT` times the run's first (a healthy run moves them by a few per cent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

GROWTH_LIMIT = 10.0


def weight_norm(accelerator: Accelerator, params: list[torch.Tensor]) -> float:
    """‖θ‖₂ over the trained parameters (FSDP's shards combined: a collective); inf or NaN if any weight is."""
    local = [param.detach() for param in params]
    local = [getattr(param, "to_local", lambda param=param: param)() for param in local]  # a DTensor's shard
    squares = (
        torch.stack(torch._foreach_norm(local)).double().square().sum()
        if local
        else torch.zeros((), dtype=torch.float64)
    )
    return math.sqrt(accelerator.reduce(squares.to(accelerator.device), reduction="sum").item())


@dataclass
class Health:
    """The run's reference for healthy weights and whether a non-finite step happened since the last checkpoint."""

    initial_norm: float  # ‖θ‖₂ of the trained parameters when the run started (kept across resumes)
    clean: bool = True

    def checkpoint_is_healthy(self, accelerator: Accelerator, params: list[torch.Tensor]) -> bool:
        """Judge the state about to be checkpointed, and start a new window."""
        norm = weight_norm(accelerator, params)
        healthy = self.clean and math.isfinite(norm) and norm <= GROWTH_LIMIT * max(self.initial_norm, 1e-12)
        self.clean = True
        return healthy


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (a host sync): all ranks skip an update together, so DDP stays in
    step."""
    return bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
