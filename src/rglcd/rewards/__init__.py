"""Reward models under one contract: ``reward(images[B,3,H,W] in [0,1], prompts) -> Tensor[B]``."""

from ..world import rewards as _world_rewards  # noqa: F401  (registers world-clip, world-aesthetic)
from . import pixel  # noqa: F401  (registers the pixel-space rewards)
from .base import RewardModel, available_rewards, build_reward, register_reward

__all__ = ["RewardModel", "available_rewards", "build_reward", "register_reward"]
