"""A run's checkpoints: written atomically (:func:`rglcd.files.atomic_folder`), listed, rotated and resumed exactly.

A checkpoint holds tensors and JSON only, and nothing in it is unpickled: the student (``model.safetensors``, or
FSDP's sharded files), its optimizer and schedule (accelerate's ``.bin`` files, read with ``weights_only=True``),
the EMA target and the latent proxy (``.safetensors``), the proxy's optimizer (``weights_only``), each rank's
generator (``.safetensors``), accelerate's RNG states (checked to load with ``weights_only`` first) and
``trainer_state.json``. A file that would need unpickling is refused before anything is loaded.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, SAFE_MODEL_NAME
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

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
    """The checkpoint ``--resume`` names: ``latest`` (None when the folder has none yet) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise TrainingError(f"--resume {resume}: not a finished rglcd checkpoint (no {TRAINER_STATE})")
    return path


# Settings a resumed run must keep: they decide the model, what the optimizer state belongs to, or the data order.
FIXED_SETTINGS = (
    "model.", "lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules", "data.source", "data.resolution",
    "data.center_crop", "data.random_flip", "data.caption_dropout", "data.shuffle_buffer", "distill.num_ddim_timesteps",
    "optim.batch_size", "optim.gradient_accumulation_steps", "optim.use_8bit_adam", "reward.mode",
    "reward.latent.model", "seed",
)  # fmt: skip


# Settings that name a file or folder: the same one, given relative or absolute, is no change.
PATH_SETTINGS = ("model.teacher", "data.source", "reward.latent.model", "logging.output_dir")


def same_setting(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if key not in PATH_SETTINGS or not (isinstance(saved, str) and isinstance(now, str)):
        return False
    return Path(saved).exists() and Path(saved).resolve() == Path(now).resolve()


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())  # (not UTF-8: a ValueError too)
        if not isinstance(state, dict) or not {"global_step", "nan_streak", "data"} <= state.keys():
            raise ValueError("global_step, nan_streak or data is missing")
        counts = [state["global_step"], state["nan_streak"]]
        if not all(type(count) is int and count >= 0 for count in counts) or not isinstance(state["data"], list):
            raise ValueError("global_step and nan_streak must be whole numbers, data a list")
    except (OSError, ValueError) as error:
        message = f"{checkpoint / TRAINER_STATE} is damaged ({error}); resume from another checkpoint"
        raise TrainingError(message) from error
    return state


def check_resume(checkpoint: Path, settings: dict, num_processes: int, sharded: bool) -> tuple[dict, dict[str, tuple]]:
    """Before any model loads: refuse a resume that cannot continue the checkpoint's run (another process count,
    FSDP or not, a changed fixed setting). Returns the checkpoint's trainer state and the other settings that
    differ (``settings`` flat, as ``{"optim.learning_rate": 1e-4, ...}``), which the resumed run takes:
    {name: (checkpoint's, now)}."""
    state = read_trainer_state(checkpoint)
    if len(state["data"]) != num_processes:  # each rank's data position and generator are saved
        raise TrainingError(
            f"{checkpoint} was saved by {len(state['data'])} processes and this run has {num_processes}; resume "
            "with the same number of processes"
        )
    if state.get("fsdp", False) != sharded:  # sharded and whole checkpoints are stored differently
        saved_with, run_with = ("DDP", "FSDP") if sharded else ("FSDP", "DDP")
        raise TrainingError(
            f"{checkpoint} was saved with {saved_with} and this run uses {run_with}; resume with the accelerate "
            "config the run started with"
        )
    saved = state.get("settings", settings)  # (checkpoints without them: nothing to compare)
    changed = {
        key: (saved.get(key), settings.get(key))
        for key in {*saved, *settings}
        if not same_setting(key, saved.get(key), settings.get(key))
    }
    fixed = sorted(key for key in changed if key.startswith(FIXED_SETTINGS))
    if fixed:
        listed = ", ".join(f"{key} ({changed[key][0]} → {changed[key][1]})" for key in fixed)
        raise TrainingError(
            f"--resume {checkpoint}: {listed} cannot change within a run; resume with the checkpoint's value(s), or "
            "start a new run in another logging.output_dir"
        )
    return state, {key: changed[key] for key in sorted(changed)}


def last_healthy_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint taken while training was healthy (:mod:`~rglcd.train.health`); checkpoints that predate
    the health record count as healthy."""
    for checkpoint in reversed(checkpoints(output_dir)):
        try:
            if json.loads((checkpoint / TRAINER_STATE).read_text()).get("healthy", True) is True:
                return checkpoint
        except (OSError, ValueError, AttributeError):
            continue
    return None


def run_id_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(
    accelerator: Accelerator, out: Path, trainer_state: dict, stream, generator: torch.Generator, keep: int,
    modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
) -> Path:  # fmt: skip
    """``checkpoints/checkpoint-N`` (N = ``trainer_state["global_step"]``): accelerate's state (student, optimizer,
    scheduler), ``modules`` (the same on every rank: the EMA target, the proxy) and ``optimizers`` (the proxy's)
    by name, each rank's generator and data position, and ``trainer_state``. Written into ``checkpoint-N.partial``
    by every rank and renamed when complete; then only the newest ``keep`` are kept."""
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{trainer_state['global_step']}"
    main = accelerator.is_main_process
    try:
        with atomic_folder(final) if main else nullcontext(partial_folder(final)) as partial:
            accelerator.wait_for_everyone()  # the main process has cleared a stale partial folder
            partial.mkdir(parents=True, exist_ok=True)
            accelerator.save_state(str(partial))
            save_file({"state": generator.get_state()}, partial / f"generator-{accelerator.process_index}.safetensors")
            data_states = gather_objects(accelerator, stream.state_dict())
            for name, module in modules.items():
                save_whole(module, partial / f"{name}.safetensors", main)
            if main:
                for name, optimizer in optimizers.items():
                    torch.save(optimizer.state_dict(), partial / f"{name}.pt")  # tensors and numbers: weights_only
                (partial / TRAINER_STATE).write_text(json.dumps({**trainer_state, "data": data_states}))
            accelerator.wait_for_everyone()  # every rank has written before the main process renames
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk shows as torch.save's RuntimeError
        raise TrainingError(f"could not write {final} (is the disk full or the folder read-only?): {error}") from error
    if main:  # renamed: the atomic moment; before it, the previous checkpoint is the latest
        own = [found for found in checkpoints(out) if run_id_of(found) == trainer_state["run_id"]]
        healthy = last_healthy_checkpoint(out)  # what a NaN stop would name: never rotated away
        for old in own[:-keep]:  # only this run's
            if old != healthy:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, state: dict, stream, generator: torch.Generator,
    modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
) -> None:  # fmt: skip
    """Restore what :func:`save_checkpoint` wrote (``state``: its trainer state, as :func:`check_resume` read it),
    after checking that nothing in it needs unpickling."""
    check_safe_to_load(checkpoint, accelerator.process_index)
    try:
        accelerator.load_state(str(checkpoint))
        for name, module in modules.items():
            load_whole(module, checkpoint / f"{name}.safetensors", accelerator.is_main_process)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(torch.load(checkpoint / f"{name}.pt", map_location="cpu", weights_only=True))
        generator.set_state(load_file(checkpoint / f"generator-{accelerator.process_index}.safetensors")["state"])
    except TrainingError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        raise TrainingError(f"{checkpoint} cannot be resumed ({type(error).__name__}: {str(error)[:300]})") from error
    stream.load_state_dict(state["data"][accelerator.process_index])
    accelerator.print(f"resumed from {checkpoint} at step {state['global_step']}")


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards the module's weights (DTensors; the EMA target of an FSDP run)."""
    return any(hasattr(param, "full_tensor") for param in module.parameters())


def whole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP-sharded module's weights gathered whole on the main process's CPU (empty elsewhere); a collective."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_whole(module: nn.Module, path: Path, main: bool) -> None:
    """The module's whole weights to ``path`` by the main process; a sharded module's are gathered first (a
    collective: every rank calls this)."""
    if is_sharded(module):
        weights = whole_state_dict(module)
        if main:
            save_file({key: value.contiguous() for key, value in weights.items()}, path)
    elif main:
        # force_contiguous: channels-last weights are not (older safetensors default to refusing them).
        save_model(module, str(path), force_contiguous=True)


def load_whole(module: nn.Module, path: Path, main: bool) -> None:
    """What :func:`save_whole` wrote, into the module; a sharded module's read by the main process and sent to the
    others' shards (a collective)."""
    if is_sharded(module):
        weights = load_file(path) if main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, weights, options=options)
    else:
        load_model(module, str(path), device=str(next(module.parameters()).device))


def check_safe_to_load(checkpoint: Path, process_index: int) -> None:
    """Refuse a checkpoint with a file that would be unpickled with code: accelerate reads its ``.bin`` files with
    ``weights_only=True`` (an unsafe one raises), but reads custom objects unrestricted and skips RNG states it
    cannot read; FSDP's sharded folders carry pickled metadata and pickled non-tensor entries."""
    unsafe = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if unsafe:
        raise TrainingError(
            f"{checkpoint} holds {', '.join(unsafe)}: pickled objects, which this version never loads (they can run "
            "code); it was written by an older rglcd: resume it with that version, or start the run again"
        )
    rng_states = checkpoint / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        if rng_states.exists():
            accelerate_load(rng_states)  # numpy and torch RNG states only, as accelerate reads them
        for metadata in checkpoint.glob("*/.metadata"):
            check_sharded_folder(metadata.parent)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as error:
        raise TrainingError(f"{checkpoint}: not a checkpoint rglcd wrote (unsafe or damaged): {error}") from error


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's metadata and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = module.startswith("torch.distributed.checkpoint.") or (module, name) in _METADATA_GLOBALS
        allowed = allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


def check_sharded_folder(folder: Path) -> None:
    """Check an FSDP (torch.distributed.checkpoint) folder: its metadata holds only checkpoint metadata, and every
    non-tensor entry (which torch loads without ``weights_only``) loads with ``weights_only``."""
    with (folder / ".metadata").open("rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with (folder / info.relative_path).open("rb") as handle:
                handle.seek(info.offset)
                torch.load(io.BytesIO(handle.read(info.length)), weights_only=True)


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
