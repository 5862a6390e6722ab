"""``mix``: a weighted sum of rewards, each optionally standardised with fixed statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .base import RewardModel, build_reward, register_reward


@register_reward("mix")
class Mix(RewardModel):
    """R(x, c) = Σ_i β_i · (R_i(x, c) − mean_i) / std_i.

    ``terms``: mappings with ``name`` (a registered reward), ``beta`` (its weight, default 1), ``kwargs`` (its
    constructor's arguments) and optionally ``mean``/``std``. Standardising with fixed statistics (e.g. measured
    on the teacher's samples) puts rewards of different ranges on one scale; a per-batch standardisation would
    not do, since the batch mean of a batch-standardised reward is always 0 and its gradient vanishes.
    """

    def __init__(self, terms: Sequence[Mapping]):
        super().__init__()
        if not terms:
            raise ValueError("mix needs at least one term: [{name: ..., beta: ...}, ...]")
        for term in terms:
            if term.get("std", 1.0) <= 0:
                raise ValueError(f"mix term {term['name']!r}: std must be > 0, got {term['std']}")
        self.rewards = nn.ModuleList(build_reward(term["name"], **term.get("kwargs", {})) for term in terms)
        self.betas = [float(term.get("beta", 1.0)) for term in terms]
        self.means = [float(term.get("mean", 0.0)) for term in terms]
        self.stds = [float(term.get("std", 1.0)) for term in terms]

    def enable_gradient_checkpointing(self) -> None:
        for reward in self.rewards:
            reward.enable_gradient_checkpointing()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return sum(
            beta * (reward(images, prompts) - mean) / std
            for reward, beta, mean, std in zip(self.rewards, self.betas, self.means, self.stds, strict=True)
        )

    def logits(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        # A pairwise softmax ignores constant shifts, so the means drop out; the scales stay.
        return sum(
            beta * reward.logits(images, prompts) / std
            for reward, beta, std in zip(self.rewards, self.betas, self.stds, strict=True)
        )
