"""Where the miniature world's artefacts live: a user cache, and the weights shipped inside the package."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_folder, cache_dir

# Seeds of the world's independent data streams: each model sees its own images.
TEACHER_SEED = 0
REWARD_SEED = 1_000
JUDGE_SEED = 2_000
EVAL_SEED = 9_000


def shipped_dir() -> Path:
    """Weights made by ``rglcd world ...`` commands and shipped with the package (see world/weights/README.md)."""
    return Path(__file__).parent / "weights"


def world_asset(name: str, make: Callable[[Path], object] | None = None) -> Path:
    """The world's ``name`` folder: ``cache/world/<name>``, else the shipped ``<name>``.

    With ``make`` it is always the cache's, filled when missing: copied from the shipped weights when they exist,
    else made by ``make(folder)``. Without, a missing asset is a FileNotFoundError naming both places.
    """
    target, shipped = cache_dir() / "world" / name, shipped_dir() / name
    if target.exists():
        return target
    if make is None:
        if shipped.is_dir():
            return shipped
        raise FileNotFoundError(f"no world {name} in {target} or {shipped}")
    with atomic_folder(target) as partial:
        if shipped.is_dir():
            shutil.copytree(shipped, partial)
        else:
            make(partial)
    return target
