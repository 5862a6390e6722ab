"""A run folder is a unit: what a run wrote there is never replaced by another run unasked, and a start that fails
writes nothing.

A new run into a folder that holds a run (started or finished) is refused unless it resumes it (``--resume``) or
replaces it (``--overwrite``). Nothing is written before the run's first step has run (:func:`commit_run`): by
then the config, the teacher, the data and the reward have loaded and been used. Only then does ``--overwrite``
delete the old run — only the entries rglcd writes, never a file or folder of the user's — and the new run's
``config.yaml`` is written.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..files import partial_folder
from .checkpoints import CHECKPOINT_PREFIX, checkpoints
from .errors import TrainingError

# What a run writes at the top of its folder (besides checkpoints/, logs/ and validation/, shared with the user's).
RUN_FILES = ("config.yaml", "train_summary.json")
RUN_FOLDERS = ("student", "target_unet", "lora", "target_lora", "latent_rm")
TRACKER_PROJECT = "rglcd"  # accelerator.init_trackers' project: its logs go to logs/rglcd
_CHECKPOINT = re.compile(rf"{CHECKPOINT_PREFIX}\d+(\.partial)?")
_VALIDATION = re.compile(r"step-\d+\.png")


def run_entries(out: Path) -> list[Path]:
    """Everything in ``out`` that a run wrote (its files and folders, a half-written one's ``.partial`` too)."""
    found = []
    for name in RUN_FILES + RUN_FOLDERS:
        found += [path for path in (out / name, partial_folder(out / name)) if path.exists()]
    folders = {"checkpoints": _CHECKPOINT, "validation": _VALIDATION}
    for folder, pattern in folders.items():
        if (out / folder).is_dir():
            found += sorted(path for path in (out / folder).iterdir() if pattern.fullmatch(path.name))
    if (out / "logs" / TRACKER_PROJECT).exists():
        found.append(out / "logs" / TRACKER_PROJECT)
    return found


def claim_run_folder(out: Path, resume: str | None, checkpoint: Path | None, overwrite: bool) -> str | None:
    """Refuse a start that would mix two runs in ``out``, before any model loads and without writing anything.
    Returns a note to print (``--resume latest`` where there is nothing to resume: a new run starts), or None."""
    if resume is not None and overwrite:
        raise TrainingError("--resume continues the run in logging.output_dir and --overwrite replaces it: give one")
    held = run_entries(out)
    if checkpoint is not None or not held or overwrite:
        if resume == "latest" and checkpoint is None:
            return f"no checkpoint in {out} to resume: starting a new run"
        return None
    found = checkpoints(out)
    named = [path.name for path in held if path.parent == out][:3] or [str(held[0].relative_to(out))]
    what = ", ".join(named + ([f"checkpoints up to {found[-1].name}"] if found else []))
    if resume == "latest":
        raise TrainingError(
            f"{out} holds a run with no checkpoint to resume ({what}): start it again with --overwrite (it replaces "
            "that run), or set a new logging.output_dir"
        )
    raise TrainingError(
        f"{out} holds a run ({what}): continue it with --resume latest, set a new logging.output_dir, or pass "
        "--overwrite to replace it"
    )


def commit_run(out: Path, config_yaml: str, overwrite: bool) -> None:
    """The run's first step has run: replace the old run if asked (only rglcd's entries), write ``config.yaml``."""
    if overwrite:
        for path in run_entries(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for folder in ("checkpoints", "validation", "logs"):  # left only if the user keeps something there
            if (out / folder).is_dir() and not any((out / folder).iterdir()):
                (out / folder).rmdir()
    out.mkdir(parents=True, exist_ok=True)
    written = out / "config.yaml.partial"  # whole or not at all
    written.write_text(config_yaml)
    written.replace(out / "config.yaml")
