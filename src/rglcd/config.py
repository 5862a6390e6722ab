"""The typed training configuration: dataclasses, YAML presets, command-line overrides, validation.

A config is validated as a whole before any model loads; every problem is reported at once, each naming
the field and the fix. The resolved config is written into every run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import shutil
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .errors import RglcdError
from .files import cache_dir, read_text
from .lora import LCM_LORA_TARGETS
from .losses import DISTANCES


class ConfigError(RglcdError, ValueError):
    """The configuration cannot run; the message lists every problem and its fix."""


MAX_SEED = 2**32 - 1  # numpy's legacy seeding, which accelerate's set_seed calls, takes seeds in [0, 2**32)


@dataclass
class ModelConfig:
    teacher: str = ""  # hub id or local diffusers folder of a Stable-Diffusion-layout pipeline
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weights files
    time_cond_proj_dim: int = 256  # size of the student's guidance-scale embedding


@dataclass
class LoraOptions:
    """LoRA RG-LCD: peft adapters on the teacher's UNet instead of training all of it (see rglcd.lora)."""

    rank: int = 0  # 0: train the whole UNet (with a guidance embedding); > 0: adapters of this rank (LCM-LoRA: 64)
    alpha: float | None = None  # None: the rank (LCM-LoRA's alpha = rank)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    fuse_on_export: bool = False  # also write OUTPUT_DIR/student: the teacher pipeline with the adapters fused


@dataclass
class DataConfig:
    source: str = ""  # webdataset tar / brace pattern / pipe: command / folder of shards or captioned images
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    shuffle_buffer: int = 1000


@dataclass
class DistillConfig:
    num_ddim_timesteps: int = 50  # N; skip k = T // N
    w_min: float = 5.0  # guidance range, LCM convention
    w_max: float = 15.0
    loss: str = "huber"  # a registered distance (rglcd.losses.DISTANCES): l2, huber, pseudo_huber, cauchy
    distance_c: float | None = None  # None: 0.001 for huber (the paper), 0.00054·√d for pseudo_huber/cauchy
    ema_decay: float = 0.95  # μ of the target network
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    lcd_weight: float = 1.0  # λ of the consistency term: loss = λ·d(f_θ, f_θ⁻) − mean R (0: the reward alone)


@dataclass
class RewardTerm:
    name: str = ""  # a registered reward (rglcd.rewards.available_rewards())
    beta: float = 1.0
    kwargs: dict = field(default_factory=dict)  # passed to the reward's constructor (weights path, ...)
    mean: float = 0.0  # the term is beta · (R − mean) / std: fixed standardisation, off by default
    std: float = 1.0


@dataclass
class LatentRewardConfig:
    """Alg. 4: the student maximises a latent proxy RM, which is fitted online to the expert (reward.terms)."""

    model: str = ""  # folder of a pretrained latent proxy RM (`rglcd lrm pretrain`)
    beta: float = 1.0  # the student's loss is d − beta · mean proxy score (cosine) of its latent prediction
    learning_rate: float = 3.3e-6  # the proxy's own AdamW
    batch_size: int = 4  # samples per batch (rm_batch) the proxy is fitted on after each student update
    loss: Literal["kl", "cross_entropy"] = "kl"
    smooth_ground_truth: bool = False  # a (½, ½) label where the expert prefers a generated latent to the data
    unlocked_image_groups: int = 1  # last groups of the proxy's image tower that learn (resnet: the attention pool)
    unlocked_text_groups: int = 0  # last groups of its text tower that learn (1: the projection)
    expert_scale: float = 1.0  # expert logits × this before the pairwise softmax
    expert_scale_from_proxy: bool = False  # × the proxy's exp(logit_scale) instead (the official ImageReward setup)
    loss_scale: float = 1.0


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = field(default_factory=list)  # empty: plain LCD; with mode latent: the expert
    mode: Literal["direct", "latent"] = "direct"  # direct: Alg. 3 through the VAE decoder; latent: Alg. 4
    latent: LatentRewardConfig = field(default_factory=LatentRewardConfig)
    decode_batch_size: int = 0  # VAE decode micro-batch for the reward; 0 = the whole batch at once
    # What the reward reads: the one-step prediction f_θ(z_{t_{n+k}}) (the paper), or the student's own
    # sample_steps-step sample from fresh noise, backpropagated through its last grad_steps steps (beyond the paper).
    target: Literal["prediction", "sample"] = "prediction"
    sample_steps: int = 2  # K of target=sample: the inference timesteps of K-step sampling
    grad_steps: int = 1  # target=sample: the last steps the gradient flows through (truncated backpropagation)
    every: int = 1  # the reward term on every N-th step only (the proxy of reward.mode=latent is fitted every step)


@dataclass
class DmdConfig:
    """Beyond RG-LCD: DMD's distribution-matching term (Yin et al. 2023/2024) on the student's own sample."""

    weight: float = 0.0  # the term's weight in the loss; 0: off (and no fake score network)
    student_steps: int = 1  # K: the student's K-step sample from pure noise the term reads (its last step has grad)
    real_guidance: float | None = None  # diffusers' CFG scale of the teacher's ("real") x̂0; null: the step's w + 1
    t_min: float = 0.02  # DMD's noise level t ~ U[t_min·T, t_max·T] (DMD2's 2 % and 98 %)
    t_max: float = 0.98
    fake_lora_rank: int = 0  # the fake score network: 0 a whole trained copy of the teacher UNet; > 0 LoRA adapters
    fake_lr: float = 1e-5  # the fake network's (and the discriminator's) own AdamW
    fake_updates: int = 1  # fake-network updates per student update (DMD2's two time-scale rule: 5)


@dataclass
class GanConfig:
    """Beyond RG-LCD: DMD2's adversarial term; the discriminator is a head on the fake score network's mid-block."""

    weight: float = 0.0  # the generator's non-saturating loss in the student's loss; 0: off
    discriminator_weight: float = 0.01  # the head's loss in the fake network's update (DMD2: 1e-2)
    t_max: float = 0.5  # the discriminator reads latents noised at t ~ U[0, t_max·T)


@dataclass
class OptimConfig:
    learning_rate: float = 1e-6  # the paper's
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = 500
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10000
    use_8bit_adam: bool = False  # needs bitsandbytes


@dataclass
class PrecisionConfig:
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    teacher_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # frozen teacher, VAE and text encoder
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "eager"] = "sdpa"  # torch's scaled_dot_product_attention, or plain matmuls
    compile: bool = False  # torch.compile of the student, target, teacher UNet and the reward's VAE decoder
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs (cuDNN's convolutions use TF32 by default already)
    channels_last: bool = False  # UNets and VAE in channels-last memory format (faster convolutions on GPUs)


@dataclass
class LoggingConfig:
    output_dir: str = "runs/rglcd"
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 10
    validation_steps: int = 500  # 0 disables validation
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red sports car"])
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    max_consecutive_nan_steps: int = 5


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dmd: DmdConfig = field(default_factory=DmdConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def presets() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in resources.files("rglcd.presets").iterdir() if p.name.endswith(".yaml")
    )


def _from_dict(cls: type, data: dict, path: str, errors: list[str]) -> Any:
    """Build dataclass ``cls`` from a nested dict, collecting unknown keys and type mismatches in ``errors``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            errors.append(f"{where}: unknown field" + (f"; did you mean {path}{close[0]}?" if close else ""))
            continue
        values[key] = _convert(hints[key], value, where, errors)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, errors: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
            return hint()
        return _from_dict(hint, value, f"{where}.", errors)
    if origin in (typing.Union, types.UnionType):  # X | None (types.UnionType: the annotations' `|`)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, errors)
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` (e.g. precision.mixed_precision=no) as false
        if value not in args:
            errors.append(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_convert(args[0], item, f"{where}[{i}]", errors) for i, item in enumerate(value)]
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            value = float(value)  # also "3e-5", which YAML 1.1 reads as a string
        except ValueError:
            errors.append(f"{where}: expected float, got {value!r}")
            return value
        if not math.isfinite(value):
            errors.append(f"{where}: must be a finite number, got {value!r}")
        return value
    if hint in (int, float, bool, str, dict) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        errors.append(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _parse_override(override: str) -> dict:
    """``optim.learning_rate=1e-5`` -> {"optim": {"learning_rate": 1e-5}}; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value (e.g. optim.batch_size=4)")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not YAML ({' '.join(str(error).split())})") from None
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def _config_data(path_or_preset: str | Path) -> dict:
    """The sections of a preset or a YAML file; ``base: PRESET`` in it starts from that preset's sections."""
    path = Path(path_or_preset)
    if path.suffix not in (".yaml", ".yml") and str(path_or_preset) in presets():
        text = resources.files("rglcd.presets").joinpath(f"{path_or_preset}.yaml").read_text()
    elif path.is_file():
        try:
            text = read_text(path)
        except ValueError as error:  # e.g. saved as UTF-16
            raise ConfigError(f"{error}; save the config as UTF-8") from None
    else:
        raise ConfigError(
            f"config {str(path_or_preset)!r} is neither a YAML file nor a preset ({', '.join(presets())})"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:  # also tags such as !!python/object, which safe_load refuses
        message = " ".join(str(error).split())
        raise ConfigError(f"{path_or_preset}: not a YAML config rglcd can read ({message})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path_or_preset}: the config must be a YAML mapping of sections")
    if "base" in data:  # that preset, with this config's sections laid over it
        base = data.pop("base")
        if base not in presets() or base == path_or_preset:
            raise ConfigError(f"{path_or_preset}: base: {base!r} is not another preset ({', '.join(presets())})")
        data = _deep_update(_config_data(base), data)
    return data


def load_config(path_or_preset: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A preset name or a YAML file, then ``section.field=value`` overrides; validated."""
    data = _config_data(path_or_preset) if path_or_preset else {}
    for override in overrides:
        _deep_update(data, _parse_override(override))
    errors: list[str] = []
    config = _from_dict(TrainConfig, data, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    # "$RGLCD_CACHE/..." (the world preset) and "~/..." paths resolve on this machine.
    for owner, name in (
        (config.model, "teacher"),
        (config.data, "source"),
        (config.logging, "output_dir"),
        (config.reward.latent, "model"),
    ):
        value = getattr(owner, name).replace("$RGLCD_CACHE", str(cache_dir()))
        setattr(owner, name, str(Path(value).expanduser()) if value.startswith("~") else value)
    validate(config)
    return config


def pipeline_vae_scale_factor(pipeline: str | Path) -> int:
    """2^(blocks − 1) from a local pipeline's vae/config.json (no weights read); 8, SD's, otherwise."""
    from .models import vae_scale_factor  # here: `rglcd --help` reads the presets without the model libraries

    vae_config = Path(pipeline) / "vae" / "config.json"
    if not vae_config.is_file():
        return 8
    try:
        return vae_scale_factor(json.loads(read_text(vae_config)))
    except (ValueError, KeyError, TypeError) as error:  # not UTF-8 or not JSON; no block_out_channels list
        raise ConfigError(f"{vae_config}: not a diffusers VAE config ({type(error).__name__}: {error})") from None


MAX_RESOLUTION = 8192  # pixels a side: 8× SDXL's; larger sizes overflow torch's storage sizes in `rglcd plan`
MAX_COUNT = 2**16  # batch sizes and accumulation steps


def resolution_problem(resolution: int, vae_scale_factor: int) -> str | None:
    """What is wrong with generating or training at ``resolution`` pixels, or None: the VAE makes one latent of
    every ``vae_scale_factor``² pixels, so another size would come out cropped (30 px as 28 with a factor of 4)."""
    if resolution > 0 and resolution % vae_scale_factor == 0:
        return None
    return f"{resolution} must be a positive multiple of the VAE factor {vae_scale_factor} (pixels per latent)"


Check = Callable[[bool, str], None]  # check(ok, message): the message is an error unless ok


def validate(config: TrainConfig) -> None:
    """Check values and paths (no model is loaded). Raises ConfigError listing every problem with its fix."""
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    vae_scale_factor = pipeline_vae_scale_factor(config.model.teacher) if config.model.teacher else 8
    _check_model_and_lora(config, check)
    _check_data_and_distill(config, vae_scale_factor, check)
    _check_reward(config, vae_scale_factor, check)
    _check_matching(config, check)
    _check_optim_and_logging(config, check)
    check(0 <= config.seed <= MAX_SEED, f"seed: must be from 0 to {MAX_SEED} (2**32 - 1), got {config.seed}")
    check(
        not (config.precision.compile and compile_unavailable()),
        "precision.compile: on the CPU torch.compile needs a C++ compiler (g++ or clang++, or $CXX), none found; "
        "install one (e.g. apt-get install g++) or set precision.compile=false",
    )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _check_model_and_lora(c: TrainConfig, check: Check) -> None:
    check(bool(c.model.teacher), "model.teacher: required; a hub id or a local diffusers pipeline folder")
    looks_local = c.model.teacher.startswith((".", "/", "~")) or c.model.teacher.count("/") != 1
    check(
        not c.model.teacher or Path(c.model.teacher).exists() or not looks_local,
        f"model.teacher: {c.model.teacher} does not exist; give an existing folder or a hub id (owner/name)",
    )
    check(c.model.time_cond_proj_dim > 0, "model.time_cond_proj_dim: must be > 0 (256 is LCM's)")
    check(c.lora.rank >= 0, "lora.rank: must be >= 0 (0 trains the whole UNet; LCM-LoRA uses 64)")
    check(c.lora.alpha is None or c.lora.alpha > 0, "lora.alpha: must be > 0, or null for the rank")
    check(0.0 <= c.lora.dropout < 1.0, "lora.dropout: must be in [0, 1)")
    check(not c.lora.rank or bool(c.lora.target_modules), "lora.target_modules: name at least one module")
    check(not c.lora.fuse_on_export or c.lora.rank > 0, "lora.fuse_on_export: only for LoRA runs (lora.rank > 0)")


def _check_data_and_distill(c: TrainConfig, vae_scale_factor: int, check: Check) -> None:
    check(bool(c.data.source), "data.source: required; webdataset shards (path, {000..009} pattern, pipe:) or a folder")
    problem = resolution_problem(c.data.resolution, vae_scale_factor)
    check(problem is None, f"data.resolution: {problem}")
    check(c.data.resolution <= MAX_RESOLUTION, f"data.resolution: at most {MAX_RESOLUTION} pixels")
    check(0.0 <= c.data.caption_dropout < 1.0, "data.caption_dropout: must be in [0, 1)")
    check(c.data.shuffle_buffer >= 0, "data.shuffle_buffer: must be >= 0")
    d = c.distill
    check(
        0 < d.num_ddim_timesteps <= 1000,
        "distill.num_ddim_timesteps: must be in [1, num_train_timesteps]; the paper uses 50",
    )
    check(d.w_min <= d.w_max, f"distill.w_min ({d.w_min}) > distill.w_max ({d.w_max}): swap them")
    check(d.w_min >= 0, "distill.w_min: must be >= 0 (LCM convention: w = 0 is the conditional model)")
    check(d.loss in DISTANCES, f"distill.loss: {d.loss!r} is not one of {', '.join(map(repr, DISTANCES.names()))}")
    check(d.distance_c is None or d.distance_c > 0, "distill.distance_c: must be > 0, or null for the default")
    check(0.0 <= d.ema_decay < 1.0, "distill.ema_decay: must be in [0, 1); the paper uses 0.95")
    check(d.lcd_weight >= 0, "distill.lcd_weight: must be >= 0 (1: the paper's consistency term; 0 turns it off)")


def _check_reward(c: TrainConfig, vae_scale_factor: int, check: Check) -> None:
    # Here: the reward modules load open_clip and transformers, which `rglcd --help` (it reads the presets) need not.
    from .rewards import available_rewards
    from .rewards.latent import PRETRAIN_COMMAND

    for i, term in enumerate(c.reward.terms):
        check(
            term.name in available_rewards(),
            f"reward.terms[{i}].name: unknown reward {term.name!r}; available: {', '.join(available_rewards())}",
        )
        check(term.std > 0, f"reward.terms[{i}].std: must be > 0 (1 = no standardisation)")
    check(c.reward.decode_batch_size >= 0, "reward.decode_batch_size: must be >= 0 (0 = whole batch)")
    check(c.reward.every >= 1, "reward.every: must be >= 1 (1: the reward term on every step)")
    if c.reward.target == "sample":
        check(bool(c.reward.terms), "reward.target: sample needs a reward to maximise; add reward.terms")
        grid = c.distill.num_ddim_timesteps
        check(
            1 <= c.reward.sample_steps <= grid,
            f"reward.sample_steps: must be in [1, distill.num_ddim_timesteps = {grid}] (the steps users sample with)",
        )
        check(
            1 <= c.reward.grad_steps <= c.reward.sample_steps,
            f"reward.grad_steps: must be in [1, reward.sample_steps = {c.reward.sample_steps}]",
        )
    if c.reward.mode != "latent":
        return
    latent = c.reward.latent
    check(bool(c.reward.terms), "reward.terms: latent mode needs the expert reward(s) the proxy is fitted to")
    size = _proxy_latent_size(latent.model)
    check(
        size is not None,
        f"reward.latent.model: {latent.model or '(empty)'} is not a latent proxy RM folder; make one with "
        f"`{PRETRAIN_COMMAND}`",
    )
    expected = c.data.resolution // vae_scale_factor
    check(
        size is None or size == expected,
        f"reward.latent.model: its latents are {size}² but data.resolution {c.data.resolution} gives "
        f"{expected}²; pretrain it with `rglcd lrm pretrain --resolution {c.data.resolution}`",
    )
    check(latent.learning_rate > 0, "reward.latent.learning_rate: must be > 0 (the paper's is 3.3e-6)")
    check(
        0 < latent.batch_size <= c.optim.batch_size,
        f"reward.latent.batch_size: must be in [1, optim.batch_size = {c.optim.batch_size}]",
    )
    check(latent.unlocked_image_groups >= 0, "reward.latent.unlocked_image_groups: must be >= 0")
    check(latent.unlocked_text_groups >= 0, "reward.latent.unlocked_text_groups: must be >= 0")
    check(latent.loss_scale > 0, "reward.latent.loss_scale: must be > 0")


def _check_matching(c: TrainConfig, check: Check) -> None:
    dmd, gan = c.dmd, c.gan
    rewarded = any(term.beta for term in c.reward.terms) if c.reward.mode == "direct" else c.reward.latent.beta != 0
    check(
        c.distill.lcd_weight > 0 or (bool(c.reward.terms) and rewarded) or dmd.weight > 0 or gan.weight > 0,
        "the loss has no term: distill.lcd_weight, dmd.weight and gan.weight are 0 and no reward term has a non-zero "
        "beta; set distill.lcd_weight=1 (the paper's) or another term's weight",
    )
    check(dmd.weight >= 0, "dmd.weight: must be >= 0 (0 turns distribution matching off)")
    check(gan.weight >= 0, "gan.weight: must be >= 0 (0 turns the adversarial term off)")
    grid = c.distill.num_ddim_timesteps
    check(1 <= dmd.student_steps <= grid, f"dmd.student_steps: must be in [1, distill.num_ddim_timesteps = {grid}]")
    check(
        dmd.real_guidance is None or dmd.real_guidance >= 1,
        "dmd.real_guidance: must be >= 1 (diffusers' CFG scale; 1 = no guidance), or null for the step's w + 1",
    )
    check(0 <= dmd.t_min < dmd.t_max <= 1, "dmd.t_min, dmd.t_max: need 0 <= t_min < t_max <= 1 (fractions of T)")
    check(dmd.fake_lora_rank >= 0, "dmd.fake_lora_rank: must be >= 0 (0: a whole trained copy of the teacher UNet)")
    check(dmd.fake_lr > 0, "dmd.fake_lr: must be > 0")
    check(1 <= dmd.fake_updates <= 100, "dmd.fake_updates: must be in [1, 100] (DMD2 uses 5)")
    check(gan.discriminator_weight > 0, "gan.discriminator_weight: must be > 0 (DMD2 uses 0.01)")
    check(0 < gan.t_max <= 1, "gan.t_max: must be in (0, 1] (a fraction of T)")
    if gan.weight > 0 and c.model.teacher:
        check(
            _has_mid_block(Path(c.model.teacher) / "unet" / "config.json"),
            "gan.weight: the discriminator reads the fake score network's mid-block, and this teacher's UNet has none "
            "(mid_block_type: null); set gan.weight=0",
        )


def _has_mid_block(unet_config: Path) -> bool:
    """Whether a local teacher's UNet has a mid-block (True when its config cannot tell: the load will)."""
    try:
        return json.loads(read_text(unet_config)).get("mid_block_type", "") is not None
    except (OSError, ValueError, AttributeError):
        return True


def _proxy_latent_size(model: str) -> int | None:
    """The latent side a latent proxy RM folder was made for (its config.json); None if it is not one."""
    from .rewards.latent import KIND, PRETRAIN_COMMAND  # (as _check_reward)
    from .rewards.weights import read_model_config

    if not model:
        return None
    try:
        return read_model_config(Path(model), KIND, f"make one with `{PRETRAIN_COMMAND}`")["latent_size"]
    except (FileNotFoundError, ValueError):
        return None


def _check_optim_and_logging(c: TrainConfig, check: Check) -> None:
    o = c.optim
    check(o.learning_rate > 0, "optim.learning_rate: must be > 0 (the paper uses 1e-6)")
    check(0 < o.batch_size <= MAX_COUNT, f"optim.batch_size: must be in [1, {MAX_COUNT}]")
    accumulation = o.gradient_accumulation_steps
    check(0 < accumulation <= MAX_COUNT, f"optim.gradient_accumulation_steps: must be in [1, {MAX_COUNT}]")
    for name in ("adam_beta1", "adam_beta2"):
        check(0.0 <= getattr(o, name) < 1.0, f"optim.{name}: must be in [0, 1)")
    check(o.adam_epsilon > 0, "optim.adam_epsilon: must be > 0")
    check(o.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    check(o.max_train_steps > 0, "optim.max_train_steps: must be > 0")
    check(o.max_grad_norm > 0, "optim.max_grad_norm: must be > 0")
    check(o.lr_warmup_steps >= 0, "optim.lr_warmup_steps: must be >= 0")
    check(
        not o.use_8bit_adam or _installed("bitsandbytes"),
        "optim.use_8bit_adam: bitsandbytes is not installed; `pip install bitsandbytes` or set false",
    )
    log = c.logging
    check(
        log.tracker != "wandb" or _installed("wandb"),
        "logging.tracker: wandb is not installed; `pip install wandb` or use tensorboard",
    )
    check(bool(log.output_dir), "logging.output_dir: required")
    check(log.checkpointing_steps > 0, "logging.checkpointing_steps: must be > 0")
    check(log.checkpoints_total_limit > 0, "logging.checkpoints_total_limit: must be > 0")
    check(log.validation_steps >= 0, "logging.validation_steps: must be >= 0 (0 disables validation)")
    check(log.log_every > 0, "logging.log_every: must be > 0")
    check(log.max_consecutive_nan_steps > 0, "logging.max_consecutive_nan_steps: must be > 0")


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would call, or None."""
    return next(filter(None, (shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "clang++"))), None)


def compile_unavailable() -> bool:
    """Whether torch.compile cannot run here: no GPU, and no C++ compiler for its CPU backend."""
    return not torch.cuda.is_available() and cpp_compiler() is None


def _installed(module: str) -> bool:
    """Whether an optional dependency can be imported (found, not imported)."""
    return importlib.util.find_spec(module) is not None
