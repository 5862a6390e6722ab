"""Where the miniature world's artefacts live: a user cache, and the weights shipped inside the package."""

from __future__ import annotations

import os
from pathlib import Path

# Seeds of the world's independent data streams: each model sees its own images.
TEACHER_SEED = 0
REWARD_SEED = 1_000
JUDGE_SEED = 2_000
EVAL_SEED = 9_000


def cache_dir() -> Path:
    """``$RGLCD_CACHE`` or ``~/.cache/rglcd``: world data, trained models and runs made on this machine."""
    return Path(os.environ.get("RGLCD_CACHE", Path.home() / ".cache" / "rglcd"))


def shipped_dir() -> Path:
    """Weights made by ``rglcd world ...`` commands and shipped with the package (see world/weights/README.md)."""
    return Path(__file__).parent / "weights"
