"""The named builders of a training run: the accelerator, the reward(s), the networks, the distillation, the
optimizers, the data stream and the unconditional embeddings, each from the typed config."""

from __future__ import annotations

import dataclasses
import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration, parse_flag_from_env
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from ..config import ConfigError, TrainConfig
from ..data import CachedStream, TrainStream
from ..lora import AdaptersOff, AdapterView, adapter_pairs, add_lora
from ..losses import ConsistencyDistance
from ..models import (
    Teacher,
    build_student,
    build_target,
    reward_input,
    sdxl_added_cond,
    speed_up,
    text_conditioning,
    use_tf32,
)
from ..rewards import build_reward
from ..step import Distillation, SampleTarget, StepNoise, StepReward

logger = logging.getLogger("rglcd.train")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Networks:
    """The three networks of a step: the trained student, the EMA target and the frozen teacher UNet (for a LoRA
    run, views of one UNet: adapters on, the EMA adapter, adapters off)."""

    student: torch.nn.Module
    target: torch.nn.Module | AdapterView
    teacher_unet: torch.nn.Module | AdaptersOff


def build_accelerator(config: TrainConfig) -> tuple[Accelerator, bool]:
    """The run's accelerator and whether it shards the student (FSDP2: its weights, gradients and Adam states)."""
    out = config.logging.output_dir
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
        project_config=ProjectConfiguration(project_dir=out, logging_dir=f"{out}/logs"),
    )
    sharded = check_engine(accelerator, config)
    if on_cpu and config.precision.mixed_precision == "fp16":  # accelerate's CPU autocast takes bf16 only
        logger.warning("precision.mixed_precision=fp16 does nothing on the CPU (it trains in float32); use bf16")
    use_tf32(config.precision.allow_tf32)
    fsdp_plugin = accelerator.state.fsdp_plugin if sharded else None
    if fsdp_plugin is not None and dataclasses.is_dataclass(fsdp_plugin.mixed_precision_policy):
        # Gradients reduced in float32, as DDP all-reduces them (accelerate's policy reduces in bf16/fp16).
        policy = dataclasses.replace(fsdp_plugin.mixed_precision_policy, reduce_dtype=torch.float32)
        fsdp_plugin.mixed_precision_policy = policy
    return accelerator, sharded


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


def build_networks(config: TrainConfig, teacher: Teacher, device: torch.device) -> Networks:
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
    unets = [student] if lora.rank else [student, networks.target, teacher.unet]  # a LoRA run's views share one
    if config.precision.attention == "eager":
        for unet in unets:
            unet.set_attn_processor(AttnProcessor())
    for module in [*unets, teacher.vae]:
        speed_up(module, config.precision.channels_last, config.precision.compile)
    return networks


def shard_target(accelerator: Accelerator, target: torch.nn.Module) -> torch.nn.Module:
    """The EMA target under FSDP2, sharded as accelerate shards the student (the same mesh, wrap policy and
    precision, so each rank's shard of θ⁻ matches its shard of θ): the EMA update is local to each shard (no
    collective), the fp32 target is never whole on a GPU, and its forward gathers one block at a time."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    target = fsdp2_prepare_model(accelerator, target)
    target.set_reshard_after_forward(True)  # the root's too: θ⁻ is sharded again when the EMA update reaches it
    return target


def ema_pairs(
    student: torch.nn.Module, target: torch.nn.Module | AdapterView
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(θ⁻, θ) for :func:`rglcd.models.update_ema`: the target's and the student's parameters, or for a LoRA run
    (the target is the EMA adapter's view of the student's UNet) the EMA and the trained adapters."""
    if isinstance(target, AdapterView):
        return adapter_pairs(student)
    return list(target.parameters()), list(student.parameters())


def build_distillation(config: TrainConfig, teacher: Teacher, student: torch.nn.Module) -> Distillation:
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


@dataclasses.dataclass(frozen=True)
class StudentReward:
    """The reward the student's loss maximises, from the config, and the one place that decides on which steps:
    the β-weighted expert (Alg. 3; ``betas`` = each ``reward.terms[i].beta``, applied by the Mix) or the frozen
    latent proxy (Alg. 4; ``betas`` = (``reward.latent.beta``,)); what it reads (decoded images, or latents) of the
    one-step prediction or, with ``reward.target: sample``, of the student's own K-step sample; ``reward.every``."""

    term: StepReward | None  # None: plain LCD
    betas: tuple[float, ...] = ()
    every: int = 1

    def applies(self, step: int) -> bool:
        """Whether the reward term is part of step ``step``'s loss (counted from 0)."""
        return self.term is not None and any(self.betas) and step % self.every == 0

    def at(self, step: int) -> StepReward | None:
        """The reward term of step ``step``, or None on the steps without it."""
        return self.term if self.applies(step) else None

    def draw(self, latents: torch.Tensor, distillation: Distillation, generator, step: int) -> StepNoise:
        """Step ``step``'s randomness, with the sample's noise on the steps whose reward reads a sample."""
        term = self.at(step)
        sample_steps = term.sample_target.num_steps if term is not None and term.sample_target is not None else 0
        return StepNoise.draw(latents, distillation, generator, sample_steps)


class WeightedProxy(torch.nn.Module):
    """Alg. 4's student reward: β · the latent proxy's score, so that −mean(R) is the configured −β·mean(proxy)."""

    def __init__(self, proxy: torch.nn.Module, beta: float):
        super().__init__()
        self.proxy, self.beta = proxy, beta

    def forward(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.beta * self.proxy(latents, prompts)  # [B]


def build_student_reward(
    config: TrainConfig, expert, proxy: torch.nn.Module | None, vae: torch.nn.Module, distillation: Distillation
) -> StudentReward:
    """The student's reward from the config: the expert ``expert`` (direct mode), the latent ``proxy`` (Alg. 4), or
    none (plain LCD: no ``reward.terms``)."""
    reward = config.reward
    sample_target = None
    if reward.target == "sample":
        sample_target = SampleTarget(distillation.sampling_timesteps(reward.sample_steps), reward.grad_steps)
    if proxy is not None:
        fn, reader, betas = WeightedProxy(proxy, reward.latent.beta), reward_input(vae, True), (reward.latent.beta,)
    elif expert is not None:
        fn, reader = expert, reward_input(vae, False, reward.decode_batch_size)
        betas = tuple(term.beta for term in reward.terms)
    else:
        return StudentReward(None)
    return StudentReward(StepReward(fn, reader, sample_target), betas, reward.every)


def build_optimizers(config: TrainConfig, student: torch.nn.Module, num_processes: int, sharded: bool = False):
    """(AdamW over the student's trained parameters, its learning-rate schedule), as diffusers' scripts count steps."""
    optim = config.optim
    optimizer = build_optimizer(config, trained_params(student), fused=not sharded)
    lr_scheduler = get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * num_processes,
        num_training_steps=optim.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


def trained_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a module trains (a LoRA student's: its adapters)."""
    return [param for param in module.parameters() if param.requires_grad]


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trained parameters. On the CPU and CUDA it is torch's fused
    AdamW (one kernel for every parameter's update, where the default runs one or several per parameter), unless
    ``fused`` is False (FSDP's sharded parameters take torch's default)."""
    optim = config.optim
    options = {}
    if optim.use_8bit_adam:
        import bitsandbytes  # optional: only for optim.use_8bit_adam (checked by the config)

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
        if fused and params and all(param.device.type in ("cpu", "cuda") for param in params):
            options["fused"] = True
    return optimizer_class(
        params,
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
        **options,
    )


def build_stream(config: TrainConfig, cached: bool, rank: int, world_size: int) -> TrainStream:
    """This rank's share of the training data: images and captions, or `rglcd cache` entries (latent
    distributions and text embeddings: no VAE encoder or text encoder per step)."""
    order = dict(
        batch_size=config.optim.batch_size, caption_dropout=config.data.caption_dropout, seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer, rank=rank, world_size=world_size,
    )  # fmt: skip
    if cached:
        return CachedStream(config.data.source, **order)
    return TrainStream(
        config.data.source, resolution=config.data.resolution, center_crop=config.data.center_crop,
        random_flip=config.data.random_flip, **order,
    )  # fmt: skip


@torch.no_grad()
def unconditional(config: TrainConfig, teacher: Teacher, stream: TrainStream, device: torch.device):
    """The empty prompt's embeddings [B, L, D] and SDXL's added conditions (or None), in float32, once for every
    step: from the cache, or encoded by the teacher."""
    batch_size, resolution = config.optim.batch_size, config.data.resolution
    if not isinstance(stream, CachedStream):
        embeds, added = text_conditioning(teacher, [""] * batch_size, resolution)
        return embeds.float(), float_conditions(added)
    embeds, added = stream.uncond_embeds.to(device).expand(batch_size, -1, -1), None
    if stream.uncond_pooled is not None:  # SDXL
        added = sdxl_added_cond(stream.uncond_pooled.to(device).expand(batch_size, -1), resolution)
    return embeds.float(), float_conditions(added)


@torch.no_grad()
def prepare_batch(batch: dict, teacher: Teacher, generator: torch.Generator, resolution: int):
    """(latents z [B, C, h, w] × scaling factor, caption embeddings [B, L, D], SDXL's added conditions or None)
    of a batch of images (VAE-encoded, text-encoded here) or of `rglcd cache` entries."""
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
    latents = DiagonalGaussianDistribution(parameters).sample(generator) * vae.config.scaling_factor
    return latents, cond_embeds, added


def check_engine(accelerator: Accelerator, config: TrainConfig) -> bool:
    """Refuse the accelerate set-ups the loop does not support, naming the fix; True under FSDP (version 2)."""
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
    if config.dmd.weight or config.gan.weight:
        raise ConfigError(
            "dmd / gan with FSDP is not supported yet (the fake score network is not sharded): launch with --multi_gpu "
            "(DDP), with dmd.fake_lora_rank > 0 to fit"
        )
    return True


def float_conditions(added: dict | None) -> dict | None:
    """SDXL's added conditions in float32, or None."""
    return None if added is None else {key: value.float() for key, value in added.items()}
