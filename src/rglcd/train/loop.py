"""``rglcd train``: the RG-LCD loop (Li et al. 2024, Alg. 3 and 4) on accelerate, read top to bottom.

build (teacher, student and EMA target, reward or latent proxy, data, optimizer) → maybe resume → loop (step →
backward → optimizer → proxy fit → EMA → log / validate / checkpoint) → export.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data import check_cache, is_cache, teacher_fingerprint
from ..export import contiguous, export_fused, export_pipeline, save_lora, write_model_card
from ..lora import STUDENT, TARGET
from ..models import load_teacher, update_ema
from ..rewards.latent import ProxyFit
from ..step import StepOutput
from .build import (
    DTYPES,
    build_accelerator,
    build_distillation,
    build_expert,
    build_networks,
    build_optimizers,
    build_stream,
    build_student_reward,
    ema_pairs,
    shard_target,
    trained_params,
    unconditional,
)
from .checkpoints import (
    check_resume,
    checkpoint_adapters_only,
    checkpoints,
    last_healthy_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    whole_state_dict,
)
from .errors import TrainingError
from .fake_score import FakeFit, FakeScore
from .forward import Forward, StepParts, training_forward
from .health import Health, all_finite, weight_norm
from .monitor import (
    StepsPeak,
    flat_scalars,
    rank_checksums,
    step_time_summary,
    validate_samples,
)
from .prefetch import Prefetch
from .proxy import Proxy
from .run_folder import TRACKER_PROJECT, claim_run_folder, commit_run

logger = logging.getLogger("rglcd.train")


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run (or resume) a distillation; returns the exported student: a pipeline folder, or for a LoRA run the
    LoRA weights folder (the fused pipeline with ``lora.fuse_on_export``). ``overwrite`` deletes another run's
    checkpoints in ``logging.output_dir`` instead of refusing to start there."""
    exported = run_training(config, resume, overwrite)
    if not (config.lora.rank and config.lora.fuse_on_export):
        return exported
    if PartialState().is_main_process:
        # Last, once the run's models are released: it loads the teacher pipeline again.
        gc.collect()
        export_fused(
            config.model.teacher, exported, Path(config.logging.output_dir) / "student",
            config.distill.num_ddim_timesteps, config.distill.timestep_scaling, revision=config.model.revision,
            variant=config.model.variant,
        )  # fmt: skip
        write_model_card(Path(config.logging.output_dir) / "student", config, "fused")
    return Path(config.logging.output_dir) / "student"


@dataclasses.dataclass
class Run:
    """Everything a run's steps read and change."""

    config: TrainConfig
    accelerator: Accelerator
    sharded: bool  # FSDP2 shards the student's weights, gradients and Adam states
    parts: StepParts  # what the forward reads; its student is the one accelerate prepared
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    expert: torch.nn.Module | None  # the reward(s) maximised (Alg. 3) or the proxy's expert (Alg. 4)
    fake_score: FakeScore | None  # the matching terms' fake score network (dmd.weight or gan.weight > 0)
    stream: Prefetch  # the data, read and decoded ahead in a background thread
    generator: torch.Generator  # the step's randomness: noise, grid indices, w, VAE posterior samples
    settings: dict  # the config, flat: written into every checkpoint, compared on resume, given to the trackers
    run_id: str  # checkpoint rotation deletes only this run's checkpoints
    health: Health
    overwrite: bool = False  # replace the run in the folder once this one's first step has run
    committed: bool = False  # the first step has run: the folder is this run's (run_folder.commit_run)
    global_step: int = 0
    nan_streak: int = 0

    @property
    def out(self) -> Path:
        return Path(self.config.logging.output_dir)


def run_training(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """The run itself: build, maybe resume, train, and export the student (a pipeline folder, or a LoRA run's
    adapter weights)."""
    accelerator, sharded = build_accelerator(config)
    set_seed(config.seed)
    out = Path(config.logging.output_dir)
    # Before any model loads: is the checkpoint one this run can continue, and is the folder this run's?
    checkpoint = resolve_resume(out, resume)
    settings = flat_scalars(config.to_dict())
    state, changed = check_resume(checkpoint, settings, accelerator.num_processes, sharded) if checkpoint else ({}, {})
    note = claim_run_folder(out, resume, checkpoint, overwrite)  # nothing is written before the first step
    if note:
        accelerator.print(note)
    # Built before the teacher, so that missing reward weights are reported before it loads.
    expert = build_expert(config)
    teacher = load_teacher(config.model.teacher, config.model.revision, config.model.variant)
    cached = is_cache(config.data.source)
    if cached:  # made by this teacher's VAE and text encoder, at this resolution? (before any cast)
        check_cache(
            config.data.source, teacher_fingerprint(teacher), config.data.resolution,
            center_crop=config.data.center_crop, random_flip=config.data.random_flip,
        )  # fmt: skip
    # The fake score network copies the teacher's UNet before a LoRA student's adapters are added to it.
    fake_score = FakeScore.build(config, teacher.unet, DTYPES[config.precision.teacher_dtype])
    networks = build_networks(config, teacher, accelerator.device)
    distillation = build_distillation(config, teacher, networks.student).to(accelerator.device)
    expert = expert.to(accelerator.device) if expert is not None else None
    optimizer, lr_scheduler = build_optimizers(config, networks.student, accelerator.num_processes, sharded)
    networks.student, optimizer, lr_scheduler = accelerator.prepare(networks.student, optimizer, lr_scheduler)
    if sharded:
        networks.target = shard_target(accelerator, networks.target)
    if config.lora.rank:
        checkpoint_adapters_only(accelerator)  # the EMA target is an adapter, saved with the student's
    proxy = Proxy.load(config, accelerator.device)
    stream = build_stream(config, cached, accelerator.process_index, accelerator.num_processes)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    uncond = unconditional(config, teacher, stream, accelerator.device)
    stream = Prefetch(stream)
    reward = build_student_reward(config, expert, proxy and proxy.model, teacher.vae, distillation)
    matching = None
    if fake_score is not None:
        matching = fake_score.to(accelerator.device).terms(config, distillation)
    parts = StepParts(
        teacher, networks, distillation, reward, uncond, proxy, config.data.resolution, config.distill.lcd_weight,
        matching,
    )  # fmt: skip
    run = Run(
        config, accelerator, sharded, parts, optimizer, lr_scheduler, expert, fake_score, stream, generator, settings,
        run_id=uuid.uuid4().hex, overwrite=overwrite,
        health=Health(state.get("initial_weight_norm") or weight_norm(accelerator, trained_params(networks.student))),
    )  # fmt: skip
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, stream, generator, *checkpointed(run))
        run.global_step, run.nan_streak = state["global_step"], state["nan_streak"]
        run.run_id = state.get("run_id", run.run_id)
        take_new_settings(run)
        if changed:
            listed = "; ".join(f"{key} {before} → {now}" for key, (before, now) in changed.items())
            accelerator.print(f"resumed with changed settings: {listed}")
    step_seconds, peak_memory = run_steps(run)
    commit(run)  # (a resumed run with no step left to run)
    return export(run, step_seconds, peak_memory)


def commit(run: Run) -> None:
    """Once the first step has run: the folder becomes this run's (``--overwrite`` replaces the old run only now),
    with its ``config.yaml``, and the trackers start."""
    if run.committed:
        return
    if run.accelerator.is_main_process:
        commit_run(run.out, run.config.to_yaml(), run.overwrite)
        run.accelerator.init_trackers(TRACKER_PROJECT, config=run.settings)
    run.accelerator.wait_for_everyone()
    run.committed = True


def take_new_settings(run: Run) -> None:
    """After a resume, the config's optimizer settings replace the checkpoint's: AdamW's betas, eps and weight
    decay, and the learning rate, at the schedule's position (the schedule itself is the config's)."""
    optim, scheduler = run.config.optim, run.lr_scheduler.scheduler  # (accelerate's wrapper holds the LambdaLR)
    scheduler.base_lrs = [optim.learning_rate] * len(scheduler.base_lrs)
    for group, base, factor in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group.update(lr=base * factor(scheduler.last_epoch), betas=(optim.adam_beta1, optim.adam_beta2))
        group.update(eps=optim.adam_epsilon, weight_decay=optim.weight_decay)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    for part in (run.parts.proxy, run.fake_score):
        if part is not None:
            part.take_new_settings(run.config)


def checkpointed(run: Run) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    """What a checkpoint holds besides accelerate's state (student, optimizer, schedule): the EMA target of a full
    run, and Alg. 4's proxy and its optimizer."""
    modules, optimizers = {}, {}
    if not run.config.lora.rank:
        modules["target"] = run.parts.networks.target
    for part in (run.parts.proxy, run.fake_score):
        if part is not None:
            part_modules, part_optimizers = part.checkpointed()
            modules.update(part_modules)
            optimizers.update(part_optimizers)
    return modules, optimizers


def run_steps(run: Run) -> tuple[list[float], dict]:
    """The loop, until ``optim.max_train_steps``; returns each optimizer step's wall-clock seconds and the steps'
    peak memory (validation and checkpoints left out)."""
    accelerator, optim, student = run.accelerator, run.config.optim, run.parts.networks.student
    # The EMA pairs, taken after prepare: FSDP replaces the student's parameters with sharded ones.
    ema_target, ema_online = ema_pairs(student, run.parts.networks.target)
    progress = tqdm(
        total=optim.max_train_steps, initial=run.global_step, desc="RG-LCD",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    step_started, step_seconds = time.perf_counter(), []
    steps_peak = StepsPeak(accelerator.device)  # what `rglcd plan` predicts: the steps' peak, not the loading's
    with progress, run.stream:  # the progress line ended and the prefetching thread stopped, also when a step raises
        batches = iter(run.stream)
        all_finite_so_far = True  # every micro-batch of the optimizer step under way had a finite loss
        while run.global_step < optim.max_train_steps:
            with accelerator.accumulate(student):
                batch = next(batches)
                forward = training_forward(run.parts, batch, run.generator, run.global_step, accelerator.autocast())
                output = forward.output
                finite = all_finite(accelerator, output.loss)  # a host sync; the others: logging, Alg. 4's fit
                all_finite_so_far &= finite
                if finite:
                    accelerator.backward(output.loss)
                    # The student updates once per optimizer step, from every micro-batch or not at all: a NaN in
                    # any of them skips the step (its gradients are zeroed below) instead of stepping on the rest.
                    updating = accelerator.sync_gradients and all_finite_so_far
                    if updating:
                        grad_norm = accelerator.clip_grad_norm_(student.parameters(), optim.max_grad_norm)
                        run.optimizer.step()
                        run.lr_scheduler.step()
                    # Alg. 4's proxy accumulates its own gradients and steps on the last micro-batch; the fake score
                    # network makes its `dmd.fake_updates` per student update, on that update's last micro-batch.
                    fit = fit_proxy(run, output, forward.latents, batch["captions"]) if run.parts.proxy else None
                    fake_fit = fit_fake_score(run, forward) if updating and run.fake_score is not None else None
                else:  # release the failed step's graph now, not when the next forward has run: two at once can OOM
                    del output, forward
                run.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step_finite, all_finite_so_far = all_finite_so_far, True
            if not step_finite:  # no update, no EMA step; stop after too many in a row
                skip_non_finite_step(run)
                continue
            run.nan_streak = 0
            ema_update(run, ema_target, ema_online)
            run.global_step += 1
            commit(run)
            progress.update(1)
            step_seconds.append(time.perf_counter() - step_started)
            if is_log_step(run):  # the loss and grad norm read back to the host only here
                logs = step_logs(run, output, grad_norm, fit, fake_fit, step_seconds[-1])
                progress.set_postfix(loss=f"{logs['distill_loss']:.4f}", sps=f"{logs['samples_per_second']:.1f}")
                accelerator.log(logs, step=run.global_step)
            after_step(run, steps_peak)
            step_started = time.perf_counter()  # a step's time leaves out validation and checkpoints
    return step_seconds, steps_peak.summary()


def ema_update(run: Run, ema_target: list[torch.Tensor], ema_online: list[torch.Tensor]) -> None:
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ after the update. Under FSDP target and student are sharded alike (shard_target):
    each rank updates its own shard, with no collective."""
    if run.sharded:
        ema_target, ema_online = [param.to_local() for param in ema_target], [p.to_local() for p in ema_online]
    update_ema(ema_target, ema_online, run.config.distill.ema_decay)


def is_log_step(run: Run) -> bool:
    return run.global_step % run.config.logging.log_every == 0 or run.global_step == run.config.optim.max_train_steps


def fit_proxy(run: Run, output: StepOutput, latents: torch.Tensor, captions: list[str]) -> ProxyFit:
    """Alg. 4, after the student update: one step of the latent proxy RM towards the expert's preferences."""
    proxy = run.parts.proxy
    with run.accelerator.autocast():
        fit = proxy.fit_loss(run.config, run.expert, run.parts.teacher.vae, output, latents, captions, run.generator)
    proxy.update(run.accelerator, fit, run.config)
    return fit


def fit_fake_score(run: Run, forward: Forward) -> FakeFit:
    """DMD / DMD2, after the student update: the fake score network (and the discriminator) fitted to the student's
    own samples of this step."""
    return run.fake_score.update(
        run.accelerator, run.config, run.parts.distillation, forward.output.generated, forward.latents,
        forward.cond_embeds, forward.added_cond, run.generator, run.accelerator.autocast,
    )  # fmt: skip


def skip_non_finite_step(run: Run) -> None:
    """Count a step whose loss was NaN/Inf; after ``logging.max_consecutive_nan_steps`` in a row, stop, naming the
    last healthy checkpoint (none is written of this state)."""
    run.nan_streak += 1
    run.health.clean = False
    logger.warning("non-finite loss at step %d (%d in a row); update skipped", run.global_step + 1, run.nan_streak)
    if run.nan_streak >= run.config.logging.max_consecutive_nan_steps:
        # No checkpoint of this state: it is the one that failed. Nor are the checkpoints taken while it diverged.
        good = last_healthy_checkpoint(run.out)
        fix = "Lower optim.learning_rate or a reward beta, or use precision.mixed_precision=bf16/no"
        if good is not None:
            advice = f"the last healthy checkpoint is {good}. {fix}, then resume from it: --resume {good}"
        else:
            advice = f"no healthy checkpoint was written. {fix}, then start again with --overwrite"
        raise TrainingError(
            f"the loss was NaN/Inf for {run.nan_streak} steps in a row at step {run.global_step + 1}; {advice} "
            "(the changed settings take effect)."
        )


def step_logs(
    run: Run, output: StepOutput, grad_norm: torch.Tensor | None, fit: ProxyFit | None, fake_fit: FakeFit | None,
    seconds: float,
) -> dict[str, float]:  # fmt: skip
    optim = run.config.optim
    samples_per_step = optim.batch_size * optim.gradient_accumulation_steps * run.accelerator.num_processes
    logs = {
        "loss": output.loss.item(),
        "distill_loss": output.distill_loss.item(),
        "lr": run.lr_scheduler.get_last_lr()[0],
        "samples_per_second": samples_per_step / max(seconds, 1e-9),
        "skipped_samples": run.stream.stats.skipped,
    }
    logs.update({f"loss/{name}": term.item() for name, term in output.terms.items()})  # each term, weighted
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if output.reward is not None:
        logs["reward"] = output.reward.mean().item()
    if fit is not None:  # Alg. 4's proxy fit of this step
        logs.update(proxy_loss=fit.loss.item(), proxy_accuracy=fit.accuracy.item())
        logs["expert_logit"] = fit.expert_logit.item()
    if fake_fit is not None:  # the fake score network's fit of this step (its last update)
        logs["fake_score_loss"] = fake_fit.loss.item()
        if fake_fit.discriminator_loss is not None:
            logs["discriminator_loss"] = fake_fit.discriminator_loss.item()
            logs["discriminator_accuracy"] = fake_fit.discriminator_accuracy.item()
    return logs


def after_step(run: Run, steps_peak: StepsPeak) -> None:
    """Validate every ``logging.validation_steps``, checkpoint every ``logging.checkpointing_steps`` (both left out
    of the steps' peak memory)."""
    step, logging_config, accelerator = run.global_step, run.config.logging, run.accelerator
    if logging_config.validation_steps and step % logging_config.validation_steps == 0:
        student = accelerator.unwrap_model(run.parts.networks.student)
        with steps_peak.paused():
            validate_samples(
                accelerator, run.config, run.parts.teacher, student, run.parts.distillation, step, run.sharded
            )
    if step % logging_config.checkpointing_steps == 0:
        with steps_peak.paused():
            save_run_checkpoint(run)


def save_run_checkpoint(run: Run) -> Path:
    """checkpoints/checkpoint-N of this step (atomic), keeping the newest ``logging.checkpoints_total_limit`` and the
    newest healthy one (:mod:`~rglcd.train.health`)."""
    healthy = run.health.checkpoint_is_healthy(run.accelerator, trained_params(run.parts.networks.student))
    state = {
        "global_step": run.global_step, "nan_streak": run.nan_streak, "fsdp": run.sharded, "run_id": run.run_id,
        "settings": run.settings, "healthy": healthy, "initial_weight_norm": run.health.initial_norm,
    }  # fmt: skip
    keep = run.config.logging.checkpoints_total_limit
    return save_checkpoint(run.accelerator, run.out, state, run.stream, run.generator, keep, *checkpointed(run))


def export(run: Run, step_seconds: list[float], peak_memory: dict) -> Path:
    """Write the student (a pipeline folder, or a LoRA run's adapters), the EMA target, the fitted proxy and
    ``train_summary.json``; returns the student's folder."""
    accelerator, networks, out = run.accelerator, run.parts.networks, run.out
    accelerator.wait_for_everyone()
    final_student = accelerator.unwrap_model(networks.student)
    trained = {"student": final_student}  # a LoRA student holds its target adapter
    if not run.config.lora.rank:
        trained["target"] = networks.target
    if run.parts.proxy is not None:
        trained["latent_rm"] = run.parts.proxy.model
    checksums, ranks_agree = rank_checksums(accelerator, trained)
    final_target = networks.target
    if run.sharded:  # whole copies on the main process's CPU (collectives: every rank takes part)
        final_student, final_target = (unsharded(accelerator, module) for module in (networks.student, networks.target))
    if accelerator.is_main_process:
        try:
            save_models(run, final_student, final_target)
        except (OSError, SafetensorError) as error:  # a full disk; every export folder is written atomically
            found = checkpoints(out)
            since = f"from {found[-1].name}, exactly" if found else "from the start"
            raise TrainingError(
                f"could not write the trained models into {out} (is the disk full?): {error}. Free space, then "
                f"`--resume latest` repeats the steps {since}, and exports"
            ) from error
        summary = {
            "global_step": run.global_step, "processes": accelerator.num_processes, "parameter_checksums": checksums,
            "ranks_agree": ranks_agree, "skipped_samples": run.stream.stats.skipped,
            "skip_reasons": run.stream.stats.reasons, "step_seconds": step_time_summary(step_seconds),
            "peak_memory_bytes": peak_memory,
        }  # fmt: skip
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    if not ranks_agree:  # raised only now: what the main process holds is exported and can be inspected
        raise TrainingError(f"the processes' parameters diverged (checksums in {out / 'train_summary.json'})")
    return out / "lora" if run.config.lora.rank else out / "student"


def unsharded(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module | None:
    """An FSDP-sharded UNet whole, as a plain UNet on the main process's CPU (None elsewhere); a collective."""
    weights = whole_state_dict(module)
    if not accelerator.is_main_process:
        return None
    plain = UNet2DConditionModel.from_config(accelerator.unwrap_model(module).config)
    plain.load_state_dict(weights)
    return plain


def save_models(run: Run, student: torch.nn.Module, target: torch.nn.Module) -> None:
    out, teacher = run.out, run.parts.teacher
    for frozen in teacher.encoders():  # the export's VAE and text encoders in float32
        frozen.float()
    if run.config.lora.rank:
        save_lora(student, out / "lora", STUDENT, teacher.is_sdxl)
        save_lora(student, out / "target_lora", TARGET, teacher.is_sdxl)
        write_model_card(out / "lora", run.config, "lora")
    else:
        distillation = run.parts.distillation
        export_pipeline(
            out / "student", student, teacher, distillation.num_ddim_timesteps, distillation.timestep_scaling
        )
        write_model_card(out / "student", run.config, "pipeline")
        contiguous(target)
        target.save_pretrained(out / "target_unet")
    if run.parts.proxy is not None:
        run.parts.proxy.export(out, run.global_step)
