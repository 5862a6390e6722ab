"""A run's checkpoints: written atomically (:func:`rglcd.files.atomic_folder`), listed, rotated and resumed exactly."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME
from safetensors.torch import load_file

from ..files import atomic_folder, partial_folder
from .errors import TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


def checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first. A save still in progress (``.partial``) is never listed."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a finished rglcd checkpoint (no {TRAINER_STATE})")
    return path


def save_checkpoint(
    accelerator: Accelerator, out: Path, trainer_state: dict, stream, generator: torch.Generator, keep: int
) -> Path:
    """``checkpoints/checkpoint-N`` (N = ``trainer_state["global_step"]``): accelerate's state (student, optimizer,
    scheduler, registered objects), each rank's generator and data position, and ``trainer_state``. Written into
    ``checkpoint-N.partial`` by every rank and renamed when complete; then only the newest ``keep`` are kept."""
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{trainer_state['global_step']}"
    main = accelerator.is_main_process
    with atomic_folder(final) if main else nullcontext(partial_folder(final)) as partial:
        accelerator.wait_for_everyone()  # the main process has cleared a stale partial folder
        partial.mkdir(parents=True, exist_ok=True)
        accelerator.save_state(str(partial))
        torch.save(generator.get_state(), partial / f"generator-{accelerator.process_index}.pt")
        data_states = gather_objects(accelerator, stream.state_dict())
        accelerator.wait_for_everyone()  # every rank has written before the main process renames
        if main:
            (partial / TRAINER_STATE).write_text(json.dumps({**trainer_state, "data": data_states}))
    if main:  # renamed: the atomic moment; before it, the previous checkpoint is the latest
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, stream, generator: torch.Generator, sharded: bool):
    """Restore accelerate's state, this rank's data position and generator; returns the trainer state."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if len(state["data"]) != accelerator.num_processes:  # each rank's data position and generator are saved
        raise TrainingError(
            f"{checkpoint} was saved by {len(state['data'])} processes and this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    if state.get("fsdp", False) != sharded:  # sharded and whole checkpoints are stored differently
        saved_with, run_with = ("DDP", "FSDP") if sharded else ("FSDP", "DDP")
        raise TrainingError(
            f"{checkpoint} was saved with {saved_with} and this run uses {run_with}; resume with the accelerate "
            "config the run started with"
        )
    accelerator.load_state(str(checkpoint))
    stream.load_state_dict(state["data"][accelerator.process_index])
    generator.set_state(torch.load(checkpoint / f"generator-{accelerator.process_index}.pt"))
    accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}")
    return state


def gather_objects(accelerator: Accelerator, value) -> list:
    """``value`` of every rank, in rank order (a collective)."""
    if accelerator.num_processes == 1:
        return [value]
    gathered = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, value)
    return gathered


def checkpoint_adapters_only(accelerator: Accelerator) -> None:
    """A LoRA run's checkpoints hold its adapters (the trained one and the EMA target), not the frozen UNet under
    them, which is the teacher's and loads with it: megabytes per checkpoint instead of the UNet's gigabytes."""

    def save(models, weights, output_dir) -> None:
        for index, state in enumerate(weights):
            weights[index] = {key: value for key, value in state.items() if ".lora_" in key}

    def load(models, input_dir) -> None:
        student = models.pop(0)  # loaded here, so that accelerate does not ask the file for the base weights
        path = Path(input_dir) / f"{SAFE_MODEL_NAME}.safetensors"
        wrong = "lora.rank or lora.target_modules changed?"
        try:
            missing, unexpected = student.load_state_dict(load_file(path), strict=False)
        except RuntimeError as error:  # shapes that differ
            raise TrainingError(f"{path} does not hold this run's adapters ({wrong}): {str(error)[:300]}") from error
        if unexpected or any(".lora_" in key for key in missing):
            raise TrainingError(
                f"{path} does not hold this run's adapters ({wrong}): {len(unexpected)} unexpected, "
                f"{sum('.lora_' in key for key in missing)} missing tensors"
            )

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
