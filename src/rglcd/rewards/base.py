"""The reward contract and the registry of rewards by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..plugins import Registry


class RewardModel(nn.Module):
    """A frozen, differentiable scorer: ``forward(images [B,3,H,W] in [0,1], prompts) -> [B]``.

    Preprocessing (resize, crop, normalise) happens inside, in torch, so gradients reach the images.
    """

    # Evaluation reports ``benchmark_scale · score`` (HPSv2's benchmark reports 100 × cosine).
    benchmark_scale: float = 1.0

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """[B] scores on the scale a pairwise softmax over them should use (the latent proxy RM's labels).

        CLIP-like rewards return ``exp(logit_scale) · cosine``, the scale they were trained with; others
        their score.
        """
        return self(images, prompts)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the model's activations in the backward pass instead of keeping them (the gradient reaches the
        images through it); rewards without support keep their activations."""

    def freeze(self) -> RewardModel:
        self.requires_grad_(False).eval()
        return self


def check_batch(images: Tensor, prompts: Sequence[str]) -> None:
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


REWARDS: Registry[Callable[..., RewardModel]] = Registry("reward")
register_reward = REWARDS.register  # class or factory decorator: ``@register_reward("hpsv2.1")``


def available_rewards() -> list[str]:
    return REWARDS.names()


def reward_factory(name: str) -> Callable[..., RewardModel]:
    """The class or factory registered as ``name``."""
    return REWARDS[name]


def build_reward(name: str, **kwargs) -> RewardModel:
    return reward_factory(name)(**kwargs).freeze()
