"""Reward models under one contract: ``reward(images[B,3,H,W] in [0,1], prompts) -> Tensor[B]``."""

from . import pixel  # noqa: F401  (registers the pixel-space rewards)
from .base import RewardModel, available_rewards, build_reward, register_reward

from ..world import rewards as _world_rewards  # noqa: F401, I001  (registers world-clip, world-aesthetic; after base)

__all__ = ["RewardModel", "available_rewards", "build_reward", "register_reward"]
