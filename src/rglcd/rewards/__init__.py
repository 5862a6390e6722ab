"""Reward models under one contract: ``reward(images[B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

Importing this package registers every built-in reward by name (``available_rewards()``). The latent proxy RM
(:mod:`rglcd.rewards.latent`) reads VAE latents instead and is not in the registry.
"""

from ..world import rewards as _world_rewards  # noqa: F401  (registers world-clip, world-aesthetic)
from . import clip, imagereward, mix, pixel  # noqa: F401  (register the paper's rewards, mix, colorfulness)
from .base import RewardModel, available_rewards, build_reward, register_reward

__all__ = ["RewardModel", "available_rewards", "build_reward", "register_reward"]
