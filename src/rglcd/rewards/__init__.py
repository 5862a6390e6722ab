"""Reward models under one contract: ``reward(images[B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

Importing this package registers every built-in reward by name (``available_rewards()``, which also lists the
rewards of installed plugins, such as the miniature world's). The latent proxy RM (:mod:`rglcd.rewards.latent`)
reads VAE latents instead and is not in the registry.
"""

from . import clip, imagereward, mix, pixel  # noqa: F401  (register the paper's rewards, mix, colorfulness)
from .base import REWARDS, RewardModel, available_rewards, build_reward, register_reward

__all__ = ["REWARDS", "RewardModel", "available_rewards", "build_reward", "register_reward"]
