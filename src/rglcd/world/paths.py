"""Where the miniature world's artefacts live: a user cache, and the weights shipped inside the package."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_folder

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


def world_asset(name: str, make: Callable[[Path], object]) -> Path:
    """``cache/world/<name>``: copied from the shipped weights when they exist, else made by ``make(folder)``."""
    target = cache_dir() / "world" / name
    if not target.exists():
        shipped = shipped_dir() / name
        with atomic_folder(target) as partial:
            if shipped.is_dir():
                shutil.copytree(shipped, partial)
            else:
                make(partial)
    return target
