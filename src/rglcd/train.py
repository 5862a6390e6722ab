"""``rglcd train``: the RG-LCD loop on accelerate, with validation, atomic checkpoints and exact resume."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError, TrainConfig
from .lora import STUDENT, TARGET, AdaptersOff, AdapterView, adapter_pairs, add_lora, export_fused, save_lora
from .losses import ConsistencyDistance
from .models import build_student, build_target, load_teacher, sdxl_added_cond, text_conditioning, update_ema
from .rewards import build_reward
from .rewards.latent import LatentClip, proxy_fit
from .sampling import export_pipeline, lcm_sample, lcm_scheduler, save_grid
from .step import Distillation, StepNoise, rglcd_step

logger = logging.getLogger("rglcd.train")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_PREFIX = "checkpoint-"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being NaN); a checkpoint was written first."""


def checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first. A save still in progress (``.tmp``) is never listed."""
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
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a finished rglcd checkpoint (no trainer_state.json)")
    return path


def train(config: TrainConfig, resume: str | None = None) -> Path:
    """Run (or resume) a distillation; returns the exported student: a pipeline folder, or for a LoRA run the
    LoRA weights folder (the fused pipeline with ``lora.fuse_on_export``)."""
    exported = distil(config, resume)
    if not (config.lora.rank and config.lora.fuse_on_export):
        return exported
    from accelerate import PartialState

    if PartialState().is_main_process:
        # Last, once the run's models are released: it loads the teacher pipeline again.
        gc.collect()
        export_fused(
            config.model.teacher, exported, Path(config.logging.output_dir) / "student",
            config.distill.num_ddim_timesteps, config.distill.timestep_scaling, revision=config.model.revision,
            variant=config.model.variant,
        )  # fmt: skip
    return Path(config.logging.output_dir) / "student"


def distil(config: TrainConfig, resume: str | None = None) -> Path:
    """The run itself: train, checkpoint, and export the student (a pipeline folder, or a LoRA run's weights)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, parse_flag_from_env, set_seed
    from diffusers.optimization import get_scheduler

    from .data import TrainStream
    from .data.cache import CachedStream, check_cache, is_cache, teacher_fingerprint

    out = Path(config.logging.output_dir)
    # Without an accelerator device, several processes (torchrun / accelerate launch) must be told to use
    # the CPU, or each would run alone instead of joining one gloo process group.
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=config.precision.mixed_precision,
        # FSDP: reduce-scatter every micro-batch; skipping it would keep whole fp32 gradients on every rank.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.optim.gradient_accumulation_steps,
            sync_each_batch=parse_flag_from_env("ACCELERATE_USE_FSDP"),
        ),
        log_with=None if config.logging.tracker == "none" else config.logging.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    sharded = check_engine(accelerator, config)  # FSDP2: the student's weights, gradients and Adam states sharded
    fsdp_plugin = accelerator.state.fsdp_plugin if sharded else None
    if fsdp_plugin is not None and dataclasses.is_dataclass(fsdp_plugin.mixed_precision_policy):
        # Gradients reduced in float32, as DDP all-reduces them (accelerate's policy reduces in bf16/fp16).
        policy = dataclasses.replace(fsdp_plugin.mixed_precision_policy, reduce_dtype=torch.float32)
        fsdp_plugin.mixed_precision_policy = policy
    set_seed(config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())

    # The reward(s), maximised directly (Alg. 3) or the expert the latent proxy is fitted to (Alg. 4): built first,
    # so that missing reward weights are reported before the teacher loads.
    expert = build_expert(config)
    teacher = load_teacher(config.model.teacher, config.model.revision, config.model.variant)
    cached = is_cache(config.data.source)
    if cached:  # made by this teacher's VAE and text encoder, at this resolution? (before any cast)
        check_cache(
            config.data.source, teacher_fingerprint(teacher), config.data.resolution,
            center_crop=config.data.center_crop, random_flip=config.data.random_flip,
        )  # fmt: skip
    networks = build_networks(config, teacher, accelerator.device)
    student, target, teacher_unet = networks.student, networks.target, networks.teacher_unet
    lora = config.lora
    distillation = build_distillation(config, teacher, student)
    expert = expert.to(accelerator.device) if expert is not None else None

    optim = config.optim
    optimizer = build_optimizer(config, [param for param in student.parameters() if param.requires_grad])
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=optim.max_train_steps * accelerator.num_processes,
    )
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    # The EMA pairs, taken after prepare: FSDP replaces the student's parameters with sharded ones. The target and
    # the teacher have no gradients or optimizer state and stay whole on every rank, as under DDP.
    ema_target, ema_online = ema_pairs(student, target)
    if lora.rank:
        checkpoint_adapters_only(accelerator)
    else:
        accelerator.register_for_checkpointing(target)  # (a LoRA target is an adapter, saved with the student)
    proxy = proxy_optimizer = None
    if config.reward.mode == "latent":
        proxy = LatentClip.from_pretrained(config.reward.latent.model)
        proxy_params, proxy_optimizer = build_proxy(config, proxy)
        # Not wrapped for DDP (the fit calls its methods, not its forward); its gradients are averaged over the
        # processes by hand in _fit_proxy, and it is saved and resumed with the run.
        proxy.to(accelerator.device)
        accelerator.register_for_checkpointing(proxy, proxy_optimizer)
    reward_fn, reward_beta = expert, 1.0 if expert is not None else 0.0  # Mix already carries each term's beta
    if proxy is not None:
        reward_fn, reward_beta = proxy, config.reward.latent.beta

    order = dict(
        batch_size=optim.batch_size, caption_dropout=config.data.caption_dropout, seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer, rank=accelerator.process_index, world_size=accelerator.num_processes,
    )  # fmt: skip
    if cached:  # `rglcd cache`: latent distributions and text embeddings, no VAE encoder or text encoder per step
        stream = CachedStream(config.data.source, **order)
    else:
        stream = TrainStream(
            config.data.source, resolution=config.data.resolution, center_crop=config.data.center_crop,
            random_flip=config.data.random_flip, **order,
        )  # fmt: skip
    # The step's randomness (noise, grid indices, w, VAE posterior samples) comes from one generator per rank.
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    global_step, nan_streak = 0, 0

    checkpoint = resolve_resume(out, resume)
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
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
        global_step, nan_streak = state["global_step"], state["nan_streak"]
        stream.load_state_dict(state["data"][accelerator.process_index])
        generator.set_state(torch.load(checkpoint / f"generator-{accelerator.process_index}.pt"))
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")

    if accelerator.is_main_process:
        accelerator.init_trackers("rglcd", config=_flat_scalars(config.to_dict()))

    def save_checkpoint() -> Path:
        return _save_checkpoint(accelerator, out, global_step, nan_streak, stream, generator, config, sharded)

    vae = teacher.vae
    with torch.no_grad():
        uncond_added = None
        if cached:
            uncond_embeds = stream.uncond_embeds.to(accelerator.device).expand(optim.batch_size, -1, -1)
            if stream.uncond_pooled is not None:  # SDXL
                uncond_pooled = stream.uncond_pooled.to(accelerator.device).expand(optim.batch_size, -1)
                uncond_added = sdxl_added_cond(uncond_pooled, config.data.resolution)
        else:
            uncond_embeds, uncond_added = text_conditioning(teacher, [""] * optim.batch_size, config.data.resolution)
        uncond_embeds, uncond_added = uncond_embeds.float(), float_conditions(uncond_added)  # once, for every step
    batches = iter(stream)
    progress = tqdm(
        total=optim.max_train_steps, initial=global_step, desc="RG-LCD", disable=not accelerator.is_local_main_process
    )
    samples_per_step = optim.batch_size * optim.gradient_accumulation_steps * accelerator.num_processes
    step_started, step_seconds = time.perf_counter(), []
    reset_peak_memory(accelerator.device)  # what `rglcd plan` predicts: the steps' peak, not the loading's
    while global_step < optim.max_train_steps:
        with accelerator.accumulate(student):
            batch = next(batches)
            latents, cond_embeds, added = prepare_batch(batch, teacher, generator, config.data.resolution)
            noise = StepNoise.draw(latents, distillation, generator)
            if proxy is not None:  # the student's reward: the proxy, frozen for this backward pass
                set_trainable(proxy_params, False)
                proxy.eval()
            with accelerator.autocast():
                output = rglcd_step(
                    student=student, target=target, teacher_unet=teacher_unet, vae=vae, distillation=distillation,
                    latents=latents, cond_embeds=cond_embeds.float(),
                    uncond_embeds=uncond_embeds, added_cond=float_conditions(added), uncond_added_cond=uncond_added,
                    noise=noise, prompts=batch["captions"], reward_fn=reward_fn, reward_beta=reward_beta,
                    reward_on_latents=proxy is not None, decode_batch_size=config.reward.decode_batch_size,
                )  # fmt: skip
            finite = bool(accelerator.gather(torch.isfinite(output.loss.detach()).reshape(1)).all())
            if finite:
                accelerator.backward(output.loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(student.parameters(), optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                if proxy is not None:
                    proxy_logs = _fit_proxy(
                        accelerator, proxy, proxy_params, proxy_optimizer, expert, vae, output, latents,
                        batch["captions"], generator, config,
                    )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)

        if not accelerator.sync_gradients:
            continue
        if not finite:
            # A non-finite loss: no update, no EMA step; stop after too many in a row.
            nan_streak += 1
            logger.warning("non-finite loss at step %d (%d in a row); update skipped", global_step + 1, nan_streak)
            if nan_streak >= config.logging.max_consecutive_nan_steps:
                path = save_checkpoint()
                raise TrainingError(
                    f"the loss was NaN/Inf for {nan_streak} steps in a row (last good state: {path}). Lower "
                    "optim.learning_rate or a reward beta, or use precision.mixed_precision=bf16/no, then "
                    "resume with --resume latest."
                )
            continue
        nan_streak = 0
        update_ema(ema_target, map(whole, ema_online), config.distill.ema_decay)
        global_step += 1
        progress.update(1)

        elapsed = time.perf_counter() - step_started
        step_seconds.append(elapsed)
        logs = {
            "loss": output.loss.item(),
            "distill_loss": output.distill_loss.item(),
            "lr": lr_scheduler.get_last_lr()[0],
            "samples_per_second": samples_per_step / max(elapsed, 1e-9),
            "skipped_samples": stream.stats.skipped,
        }
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if output.reward is not None:
            logs["reward"] = output.reward.mean().item()
        if proxy is not None:
            logs.update(proxy_logs)
        progress.set_postfix(loss=f"{logs['distill_loss']:.4f}", sps=f"{logs['samples_per_second']:.1f}")
        if global_step % config.logging.log_every == 0 or global_step == optim.max_train_steps:
            accelerator.log(logs, step=global_step)
        if config.logging.validation_steps and global_step % config.logging.validation_steps == 0:
            validate_samples(
                accelerator, config, teacher, accelerator.unwrap_model(student), distillation, global_step, sharded
            )
        if global_step % config.logging.checkpointing_steps == 0:
            save_checkpoint()
        step_started = time.perf_counter()  # a step's time leaves out validation and checkpoints
    progress.close()
    peak_memory = peak_memory_of_the_steps(accelerator.device)

    accelerator.wait_for_everyone()
    final_student = accelerator.unwrap_model(student)
    trained = {"student": final_student}  # a LoRA student holds its target adapter
    if not lora.rank:
        trained["target"] = target
    if proxy is not None:
        trained["latent_rm"] = proxy
    checksums, ranks_agree = rank_checksums(accelerator, trained)
    student_dir = out / "student"
    if sharded:  # one whole copy on the main process (a collective: every rank takes part)
        student_weights = accelerator.get_state_dict(student)
        if accelerator.is_main_process:  # on the CPU, where the gathered weights are: no second UNet on the GPU
            final_student = copy.deepcopy(target.cpu())
            final_student.load_state_dict(student_weights)
    if accelerator.is_main_process:
        for frozen in teacher.encoders():  # the export's VAE and text encoders in float32
            frozen.float()
        if lora.rank:
            save_lora(final_student, out / "lora", STUDENT, teacher.is_sdxl)
            save_lora(final_student, out / "target_lora", TARGET, teacher.is_sdxl)
        else:
            export_pipeline(
                student_dir, final_student, teacher, distillation.num_ddim_timesteps, distillation.timestep_scaling
            )
            target.save_pretrained(out / "target_unet")
        if proxy is not None:
            proxy.save_pretrained(out / "latent_rm", {"fitted_steps": global_step})
        (out / "train_summary.json").write_text(
            json.dumps(
                {
                    "global_step": global_step,
                    "processes": accelerator.num_processes,
                    "parameter_checksums": checksums,
                    "ranks_agree": ranks_agree,
                    "skipped_samples": stream.stats.skipped,
                    "skip_reasons": stream.stats.reasons,
                    "step_seconds": _step_time_summary(step_seconds),
                    "peak_memory_bytes": peak_memory,
                },
                indent=2,
            )
        )
    accelerator.end_training()
    if not ranks_agree:  # raised only now: what the main process holds is exported and can be inspected
        raise TrainingError(f"the processes' parameters diverged (checksums in {out / 'train_summary.json'})")
    return out / "lora" if lora.rank else student_dir


@dataclasses.dataclass
class Networks:
    """The three networks of a step: the trained student, the EMA target and the frozen teacher UNet (for a LoRA
    run, views of one UNet: adapters on, the EMA adapter, adapters off)."""

    student: torch.nn.Module
    target: torch.nn.Module | AdapterView
    teacher_unet: torch.nn.Module | AdaptersOff


def build_expert(config: TrainConfig) -> torch.nn.Module | None:
    """The reward terms as one :class:`~rglcd.rewards.mix.Mix` (None without terms), checkpointed with
    ``precision.gradient_checkpointing``; missing weights are a ConfigError."""
    if not config.reward.terms:
        return None
    terms = [dataclasses.asdict(term) for term in config.reward.terms]
    try:
        expert = build_reward("mix", terms=terms)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"reward.terms: {error}") from error
    if config.precision.gradient_checkpointing:
        expert.enable_gradient_checkpointing()
    return expert


def build_networks(config: TrainConfig, teacher, device: torch.device) -> Networks:
    """Student, target and teacher UNet on ``device``, in the config's dtypes: the student in float32 (master
    weights), the frozen parts in ``precision.teacher_dtype`` (a LoRA run's shared UNet stays float32)."""
    teacher_dtype = DTYPES[config.precision.teacher_dtype]
    lora = config.lora
    if lora.rank:
        # LoRA: adapters on the teacher's own UNet; with them off it is the teacher, the EMA adapter is the target.
        student = add_lora(teacher.unet, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        student.to(device)  # float32: its base weights are shared with the teacher
        networks = Networks(student, AdapterView(student), AdaptersOff(student))
        teacher.to(device, teacher_dtype, unet=False)
    else:
        student = build_student(teacher.unet, config.model.time_cond_proj_dim)  # float32 master weights
        target = build_target(student).to(device)
        teacher.to(device, teacher_dtype)
        networks = Networks(student, target, teacher.unet)
    if config.precision.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        # The reward's gradient passes through the frozen decoder: its activations are the step's largest.
        teacher.vae.enable_gradient_checkpointing()
    if config.precision.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        for unet in [student] if lora.rank else [student, networks.target, teacher.unet]:
            unet.set_attn_processor(AttnProcessor())
    return networks


def ema_pairs(student: torch.nn.Module, target) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(θ⁻, θ) for :func:`rglcd.models.update_ema`: the target's and the student's parameters, or for a LoRA run
    (the target is the EMA adapter's view of the student's UNet) the EMA and the trained adapters."""
    if isinstance(target, AdapterView):
        return adapter_pairs(student)
    return list(target.parameters()), list(student.parameters())


def build_distillation(config: TrainConfig, teacher, student: torch.nn.Module) -> Distillation:
    return Distillation(
        teacher.schedule,
        num_ddim_timesteps=config.distill.num_ddim_timesteps,
        w_min=config.distill.w_min,
        w_max=config.distill.w_max,
        distance=ConsistencyDistance(config.distill.loss, config.distill.distance_c),
        sigma_data=config.distill.sigma_data,
        timestep_scaling=config.distill.timestep_scaling,
        time_cond_proj_dim=student.config.time_cond_proj_dim or 0,
    )


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trained parameters."""
    optim = config.optim
    optimizer_class = torch.optim.AdamW
    if optim.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        params,
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
    )


def build_proxy(config: TrainConfig, proxy: LatentClip) -> tuple[list, torch.optim.Optimizer]:
    """Unlock Alg. 4's latent proxy RM's trained groups and give them their own AdamW: (trained params, optimizer)."""
    latent, optim = config.reward.latent, config.optim
    proxy.unlock(latent.unlocked_image_groups, latent.unlocked_text_groups)
    params = [param for param in proxy.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=latent.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon
    )
    return params, optimizer


@torch.no_grad()
def prepare_batch(batch: dict, teacher, generator: torch.Generator, resolution: int):
    """(latents z [B, C, h, w] × scaling factor, caption embeddings [B, L, D], SDXL's added conditions or None)
    of a batch of images (VAE-encoded, text-encoded here) or of `rglcd cache` entries."""
    from .data.cache import sample_posterior

    vae = teacher.vae
    device = next(vae.parameters()).device
    added = None  # SDXL's pooled embedding and size conditioning
    if "latent_parameters" in batch:  # the cache: no VAE encoder or text encoder per step
        parameters = batch["latent_parameters"].to(device)  # [B, 2C, h, w]
        cond_embeds = batch["prompt_embeds"].to(device)
        if "pooled_prompt_embeds" in batch:  # SDXL
            added = sdxl_added_cond(batch["pooled_prompt_embeds"].to(device), resolution)
    else:
        pixels = batch["pixel_values"].to(device, vae.dtype)
        parameters = vae.encode(pixels).latent_dist.parameters.float()  # [B, 2C, h, w]: mean, logvar
        cond_embeds, added = text_conditioning(teacher, batch["captions"], resolution)
    latents = sample_posterior(parameters, generator) * vae.config.scaling_factor
    return latents, cond_embeds, added


def checkpoint_adapters_only(accelerator) -> None:
    """A LoRA run's checkpoints hold its adapters (the trained one and the EMA target), not the frozen UNet under
    them, which is the teacher's and loads with it: megabytes per checkpoint instead of the UNet's gigabytes."""
    from accelerate.utils import SAFE_MODEL_NAME
    from safetensors.torch import load_file

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


def check_engine(accelerator, config: TrainConfig) -> bool:
    """Refuse the accelerate set-ups the loop does not support, naming the fix; True under FSDP (version 2)."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported (its engine owns the student, which the EMA target, the validation and the "
            "export need whole); launch with an FSDP config (docs/accelerate/fsdp.yaml) or with --multi_gpu (DDP)"
        )
    if engine != DistributedType.FSDP:
        if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.is_main_process:
            logger.warning(
                "FSDP was asked for, but accelerate runs this as %s (it shards only over several GPU processes): "
                "the student is whole on every process",
                engine.value,
            )
        return False
    if not getattr(accelerator, "is_fsdp2", False):
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (FSDP2 needs torch >= 2.6 "
            "and accelerate >= 1.6)"
        )
    if config.lora.rank:
        raise ConfigError(
            "LoRA with FSDP is not supported (the adapters are a few MB; the base weights they share with the "
            "teacher would be sharded for nothing): launch LoRA runs with --multi_gpu (DDP)"
        )
    if config.optim.use_8bit_adam:
        raise ConfigError("optim.use_8bit_adam with FSDP is not supported: set optim.use_8bit_adam=false")
    return True


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
    """The peak since :func:`reset_peak_memory`: bytes allocated on the GPU, or the process's resident high-water
    mark on the CPU (which also holds Python, torch and the libraries)."""
    if device.type == "cuda":
        return {"device": "cuda", "max_allocated": torch.cuda.max_memory_allocated(device)}
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {"device": "cpu", "resident_high_water_mark": None}
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return {"device": "cpu", "resident_high_water_mark": kib * 1024}


def _step_time_summary(seconds: list[float]) -> dict:
    """Wall-clock seconds per optimizer step of this launch (the first one warms up, so it is kept apart)."""
    later = sorted(seconds[1:])
    return {
        "steps": len(seconds),
        "first": seconds[0] if seconds else None,
        "median_after_first": later[len(later) // 2] if later else None,
        "min_after_first": later[0] if later else None,
        "max_after_first": later[-1] if later else None,
    }


def float_conditions(added: dict | None) -> dict | None:
    """SDXL's added conditions in float32, or None."""
    return None if added is None else {key: value.float() for key, value in added.items()}


def set_trainable(params: list[torch.nn.Parameter], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)


def _fit_proxy(
    accelerator, proxy, proxy_params, proxy_optimizer, expert, vae, output, latents, captions, generator, config
) -> dict[str, float]:
    """Alg. 4, after the student update: one step of the latent proxy RM towards the expert's preferences."""
    latent = config.reward.latent
    set_trainable(proxy_params, True)
    proxy.train()
    indices = torch.randperm(len(latents), generator=generator)[: latent.batch_size].to(latents.device)
    with accelerator.autocast():
        fit = proxy_fit(
            proxy, expert, vae,
            model_pred=output.model_pred, target=output.target, latents=latents, prompts=captions, indices=indices,
            kind=latent.loss, smooth_ground_truth=latent.smooth_ground_truth, expert_scale=latent.expert_scale,
            expert_scale_from_proxy=latent.expert_scale_from_proxy, decode_batch_size=config.reward.decode_batch_size,
        )  # fmt: skip
    if bool(accelerator.gather(torch.isfinite(fit.loss.detach()).reshape(1)).all()):
        (fit.loss * latent.loss_scale / config.optim.gradient_accumulation_steps).backward()
    else:  # a non-finite preference loss would poison the proxy, and with it every later student step
        logger.warning("non-finite latent proxy loss; the proxy's update from this batch is skipped")
    if accelerator.sync_gradients:
        if accelerator.num_processes > 1:  # as DDP does for the student: every rank takes the mean gradient
            for param in proxy_params:
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")
        proxy_optimizer.step()
        proxy_optimizer.zero_grad(set_to_none=True)
    return {
        "proxy_loss": fit.loss.item(),
        "proxy_accuracy": fit.accuracy.item(),
        "expert_logit": fit.expert_logit.item(),
    }


def _save_checkpoint(
    accelerator, out: Path, global_step: int, nan_streak: int, stream, generator, config, sharded: bool
) -> Path:
    """Write checkpoint-N atomically: everything goes to checkpoint-N.tmp, which is renamed when complete."""
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{global_step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    torch.save(generator.get_state(), partial / f"generator-{accelerator.process_index}.pt")
    data_states = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_gather_object(data_states, stream.state_dict())
    else:
        data_states = [stream.state_dict()]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "nan_streak": nan_streak, "data": data_states, "fsdp": sharded}
        (partial / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)  # the atomic moment: before it, the previous checkpoint is the latest
        for old in checkpoints(out)[: -config.logging.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


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
    rows = []
    for num_steps in (1, 2, 4):
        images = lcm_sample(
            student, teacher.vae, teacher, scheduler, list(config.logging.validation_prompts), num_steps=num_steps,
            generator=torch.Generator(accelerator.device).manual_seed(config.seed), resolution=config.data.resolution,
        )  # fmt: skip
        rows.append(torch.cat(list(images.float().cpu()), dim=2))  # [3, H, P·W]
    student.train()
    if not accelerator.is_main_process:
        return
    grid = torch.cat(rows, dim=1)  # [3, 3·H, P·W]: rows are 1, 2, 4 steps
    folder = Path(config.logging.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    save_grid(grid[None], folder / f"step-{global_step:08d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/1-2-4-steps", grid, global_step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=global_step)


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"optim.learning_rate": 1e-6, ...}; lists and None become strings (tracker hparams)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
