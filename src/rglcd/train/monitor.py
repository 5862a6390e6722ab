"""What a run reports: parameter checksums across ranks, the steps' peak memory and time, validation grids, and the
config as tracker hyper-parameters."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import TrainConfig
from ..grid import steps_text
from ..sampling import lcm_sample, lcm_scheduler, save_grid

logger = logging.getLogger("rglcd.train")


def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole: FSDP's shards (a DTensor) gathered from every rank, a collective; else the parameter."""
    full_tensor = getattr(param, "full_tensor", None)  # DTensor's; torch.distributed.tensor is public from 2.5 on
    return full_tensor() if full_tensor is not None else param


def rank_checksums(accelerator, modules: dict[str, torch.nn.Module]) -> tuple[dict[str, float], bool]:
    """Each module's parameter checksum (Σ p + Σ p², float64, over whole parameters) on this rank, and whether
    every rank has the same (DDP keeps the student in step, the EMA target follows it, the proxy's gradients are
    averaged by hand; FSDP shards are gathered first)."""
    local = torch.tensor(
        [
            sum((p.double().sum() + p.double().square().sum()).item() for p in map(whole, module.parameters()))
            for module in modules.values()
        ],
        dtype=torch.float64,
        device=accelerator.device,
    )
    every_rank = accelerator.gather(local[None]).cpu()  # [processes, modules]
    agree = torch.equal(every_rank, every_rank[:1].expand_as(every_rank))
    if not agree:
        logger.error("parameters diverged across processes: per rank %s for %s", every_rank.tolist(), list(modules))
    return dict(zip(modules, local.tolist(), strict=True)), agree


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak memory anew: the GPU's allocator statistics, or on Linux the process's resident
    high-water mark (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the high-water mark then counts from the start of the process
        pass


def peak_memory_of_the_steps(device: torch.device) -> dict:
    """The peak since :func:`reset_peak_memory`: bytes allocated on the GPU and reserved by torch's caching allocator
    (what the GPU must hold: allocated plus the cached blocks), or the process's resident high-water mark on the CPU
    (which also holds Python, torch and the libraries)."""
    if device.type == "cuda":
        return {
            "device": "cuda",
            "max_allocated": torch.cuda.max_memory_allocated(device),
            "max_reserved": torch.cuda.max_memory_reserved(device),
        }
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {"device": "cpu", "resident_high_water_mark": None}
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return {"device": "cpu", "resident_high_water_mark": kib * 1024}


class StepsPeak:
    """The peak memory of the training steps alone (what ``rglcd plan`` predicts): validation and checkpointing run
    :meth:`paused`, their own peaks are left out. The peak counters are process-wide, so a pause reads the steps'
    peak so far and the resume starts the counters anew."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._peak: dict = {}
        reset_peak_memory(device)

    def pause(self) -> None:
        """Keep the steps' peak so far."""
        now = peak_memory_of_the_steps(self.device)
        self._peak = {
            key: max(value, self._peak[key]) if isinstance(self._peak.get(key), int) else value
            for key, value in now.items()
        }  # fmt: skip

    def resume(self) -> None:
        """Count anew from here, without what ran since :meth:`pause`."""
        if self.device.type == "cuda":
            # The blocks validation left cached would count in the steps' reserved peak (the counters restart from
            # what is reserved now); the steps reserve again what they need.
            torch.cuda.empty_cache()
        reset_peak_memory(self.device)

    @contextmanager
    def paused(self):
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def summary(self) -> dict:
        """The steps' peak (``train_summary.json``'s ``peak_memory_bytes``)."""
        self.pause()
        return dict(self._peak)


def step_time_summary(seconds: list[float]) -> dict:
    """Wall-clock seconds per optimizer step of this launch (the first one warms up, so it is kept apart)."""
    later = sorted(seconds[1:])
    return {
        "steps": len(seconds),
        "first": seconds[0] if seconds else None,
        "mean_after_first": sum(later) / len(later) if later else None,
        "median_after_first": later[len(later) // 2] if later else None,
        "min_after_first": later[0] if later else None,
        "max_after_first": later[-1] if later else None,
    }


@torch.no_grad()
def validate_samples(
    accelerator, config: TrainConfig, teacher, student, distillation, global_step: int, sharded: bool = False
) -> None:
    """Sample the validation prompts at 1, 2 and 4 steps (fixed seed) into one PNG grid, and log it. A sharded
    student samples on every rank (its forward gathers weights from all of them); the main process writes."""
    if not config.logging.validation_prompts or not (sharded or accelerator.is_main_process):
        return
    student.eval()
    scheduler = lcm_scheduler(teacher.scheduler_config, distillation.num_ddim_timesteps, distillation.timestep_scaling)
    prompts = list(config.logging.validation_prompts)
    rows, step_counts = [], (1, 2, 4)
    for num_steps in step_counts:
        images = lcm_sample(
            student, teacher.vae, teacher, scheduler, prompts, num_steps=num_steps,
            generator=torch.Generator(accelerator.device).manual_seed(config.seed), resolution=config.data.resolution,
        )  # fmt: skip
        rows.append(images.float().cpu())  # [P, 3, H, W]
    student.train()
    if not accelerator.is_main_process:
        return
    folder = Path(config.logging.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    save_grid(rows, folder / f"step-{global_step:08d}.png", prompts, [steps_text(n) for n in step_counts])
    grid = torch.cat([torch.cat(list(images), dim=2) for images in rows], dim=1)  # [3, 3·H, P·W]: 1, 2, 4 steps
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/1-2-4-steps", grid, global_step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=global_step)


def flat_scalars(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"optim.learning_rate": 1e-6, ...}; lists and None become strings (tracker hparams)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
