"""The student as diffusers folders: an LCM pipeline, LoRA weights (and the teacher's pipeline with them fused),
and loading an exported LCM back for sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import yaml
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft.utils import get_peft_model_state_dict
from torch import nn

from .config import TrainConfig
from .files import atomic_folder
from .lora import STUDENT
from .models import Teacher, TeacherLoadError, read_pipeline_index
from .sampling import lcm_scheduler


def export_pipeline(
    out_dir: str | Path,
    student: nn.Module,
    teacher: Teacher,
    num_ddim_timesteps: int = 50,
    timestep_scaling: float = 10.0,
) -> Path:
    """Write a LatentConsistencyModelPipeline folder (a StableDiffusionXLPipeline with an LCMScheduler for an SDXL
    teacher): ``DiffusionPipeline.from_pretrained(out_dir)`` loads it.

    Written to a sibling temporary folder first and renamed into place, so a crash never leaves a
    half-written pipeline at ``out_dir``.
    """
    out_dir = Path(out_dir)
    scheduler = lcm_scheduler(teacher.scheduler_config, num_ddim_timesteps, timestep_scaling)
    if teacher.is_sdxl:  # diffusers' SDXL pipeline feeds a guidance embedding to a UNet that has one
        pipeline = StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=student, scheduler=scheduler,
        )  # fmt: skip
    else:
        pipeline = LatentConsistencyModelPipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=student,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    contiguous(*(part for part in pipeline.components.values() if isinstance(part, nn.Module)))
    with atomic_folder(out_dir) as partial:
        pipeline.save_pretrained(partial)
    return out_dir


def contiguous(*modules: nn.Module) -> None:
    """In place: every weight back in the contiguous memory format. Channels-last weights
    (``precision.channels_last``) are not contiguous, and safetensors refuses to save them (diffusers makes them
    contiguous itself only from 0.33 on)."""
    for module in modules:
        module.to(memory_format=torch.contiguous_format)


def load_lcm(model: str | Path):
    """Load an exported (or any diffusers LCM) pipeline folder or hub id on the CPU, as saved (the caller places it:
    :func:`rglcd.models.place`); errors name what is wrong."""
    index = read_pipeline_index(str(model), revision=None)
    if "unet" not in index or "vae" not in index:
        raise TeacherLoadError(f"{model} is not a UNet latent diffusion pipeline (model_index.json: {sorted(index)})")
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(model))
    except (ValueError, AttributeError, TypeError) as error:
        # How diffusers refuses a model_index.json naming a custom module (ValueError), a pipeline class it does not
        # have (AttributeError) or a custom pipeline as [module, class] (TypeError); also weights of the wrong shape.
        raise TeacherLoadError(
            f"{model}: diffusers cannot load this pipeline ({type(error).__name__}: {error})"
        ) from error
    has_guidance_input = pipeline.unet.config.get("time_cond_proj_dim") is not None
    # A distilled full student has a guidance embedding; a fused LoRA student has none but ships an LCMScheduler.
    if not has_guidance_input and not isinstance(pipeline.scheduler, LCMScheduler):
        raise TeacherLoadError(
            f"{model} is not a distilled LCM: its UNet has no guidance embedding (time_cond_proj_dim) and its "
            "scheduler is not an LCMScheduler. Sample a teacher with its own pipeline (or `rglcd eval`), or distil "
            "it with rglcd first."
        )
    if not isinstance(pipeline.scheduler, LCMScheduler):
        pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def save_lora(unet: nn.Module, folder: str | Path, adapter: str = STUDENT, sdxl: bool = False) -> Path:
    """One adapter as diffusers LoRA weights (``folder/pytorch_lora_weights.safetensors``), for an SD or SDXL
    pipeline's ``load_lora_weights``."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter)  # PEFT keys, which load_lora_weights reads
    # The file carries no alpha, and loaders take alpha = rank (scaling 1): fold alpha / rank into B.
    config = unet.peft_config[adapter]
    scaling = config.lora_alpha / config.r
    # .contiguous(): a channels-last run's 3×3 lora_A weights are not, and safetensors refuses them.
    state = {key: (value * scaling if ".lora_B." in key else value).contiguous() for key, value in state.items()}
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    with atomic_folder(folder) as partial:
        pipeline_class.save_lora_weights(partial, unet_lora_layers=state, safe_serialization=True)
    return Path(folder)


def fused_lora_pipeline(
    teacher: str,
    lora_folder: str | Path,
    num_ddim_timesteps: int,
    timestep_scaling: float,
    revision: str | None = None,
    variant: str | None = None,
):
    """The teacher's pipeline with the adapters fused into its UNet and an LCMScheduler on the distillation's grid:
    a few-step sampler without peft."""
    # The weights distilled from (revision, variant); SD's safety checker is not part of the student.
    optional = {
        name: None for name in ("safety_checker", "feature_extractor") if name in read_pipeline_index(teacher, revision)
    }
    pipeline = DiffusionPipeline.from_pretrained(teacher, revision=revision, variant=variant, **optional)
    pipeline.load_lora_weights(str(lora_folder))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    pipeline.scheduler = lcm_scheduler(dict(pipeline.scheduler.config), num_ddim_timesteps, timestep_scaling)
    return pipeline


def export_fused(
    teacher: str,
    lora_folder: str | Path,
    out_dir: str | Path,
    num_ddim_timesteps: int,
    timestep_scaling: float,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """:func:`fused_lora_pipeline`, written atomically: ``DiffusionPipeline.from_pretrained(out_dir)`` samples in a
    few steps without peft."""
    pipeline = fused_lora_pipeline(teacher, lora_folder, num_ddim_timesteps, timestep_scaling, revision, variant)
    with atomic_folder(out_dir) as partial:
        pipeline.save_pretrained(partial)
    return Path(out_dir)


CARD_FILE = "README.md"
CARD_MARKER = "<!-- made by rglcd -->"  # `rglcd eval` adds its table only to cards it recognises
EVALUATION_HEADING = "## Evaluation (`rglcd eval`)"


def _reward_description(config: TrainConfig) -> str:
    reward = config.reward
    if not reward.terms:
        return "none: plain latent consistency distillation (β = 0)"
    terms = " + ".join(f"{term.name} (β {term.beta:g})" for term in reward.terms)
    if reward.mode == "latent":
        text = f"{terms} as the expert of a latent proxy reward model fitted online (Alg. 4; β {reward.latent.beta:g})"
    else:
        text = f"{terms}, through the VAE decoder (Alg. 3)"
    if reward.target == "sample":
        text += (
            f"; on the student's own {reward.sample_steps}-step sample, backpropagated through its last "
            f"{reward.grad_steps} step(s)"
        )
    else:
        text += "; on the one-step prediction (the paper)"
    return text + (f"; every {reward.every} steps" if reward.every > 1 else "")


def model_card(config: TrainConfig, kind: Literal["pipeline", "lora", "fused"], location: str) -> str:
    """A diffusers-style model card (YAML metadata, then Markdown) of a distilled student: how it was made and how to
    sample it. ``kind``: a pipeline folder with the student UNet, LoRA weights, or the teacher with them fused."""
    teacher, distill, optim = config.model.teacher, config.distill, config.optim
    is_hub_id = teacher.count("/") == 1 and not Path(teacher).exists()
    tags = ["text-to-image", "latent-consistency-model", "rg-lcd", "rglcd", *(["lora"] if kind == "lora" else [])]
    metadata = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if is_hub_id:
        metadata["base_model"] = teacher
    name = "RG-LCM" if config.reward.terms else "LCM"
    student = (
        f"LoRA adapters, rank {config.lora.rank}, alpha {config.lora.alpha or config.lora.rank:g}"
        if config.lora.rank
        else f"the whole UNet, with a guidance embedding of size {config.model.time_cond_proj_dim}"
    )
    rows = {
        "teacher": f"`{teacher}`",
        "student": student,
        "training steps × batch": f"{optim.max_train_steps} × {optim.batch_size} per process"
        f" × {optim.gradient_accumulation_steps} accumulation",
        "learning rate": f"{optim.learning_rate:g} ({optim.lr_scheduler}, {optim.lr_warmup_steps} warm-up steps)",
        "guidance range w": f"[{distill.w_min:g}, {distill.w_max:g}] (LCM convention)",
        "DDIM grid": f"{distill.num_ddim_timesteps} timesteps",
        "distance": f"{distill.loss}" + (f" (c {distill.distance_c:g})" if distill.distance_c else ""),
        "EMA μ": f"{distill.ema_decay:g}",
        "reward": _reward_description(config),
        "data": f"`{config.data.source}` at {config.data.resolution} px",
        "seed": str(config.seed),
    }
    table = "\n".join(
        ["| setting | value |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows.items())]
    )
    if kind == "lora":  # no guidance input: the teacher's CFG is distilled in, so diffusers' guidance stays ≤ 1
        guidance = 1.0
        loading = (
            f'pipe = DiffusionPipeline.from_pretrained("{teacher}"); pipe.scheduler = '
            f'LCMScheduler.from_config(pipe.scheduler.config); pipe.load_lora_weights("{location}")\n'
        )
        imports = "from diffusers import DiffusionPipeline, LCMScheduler"
    else:
        guidance = 1.0 if config.lora.rank else (distill.w_min + distill.w_max) / 2 + 1  # w = guidance − 1
        loading = f'pipe = DiffusionPipeline.from_pretrained("{location}")\n'
        imports = "from diffusers import DiffusionPipeline"
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---
{CARD_MARKER}

# {name} distilled from `{teacher}`

A latent consistency model made with rglcd by Reward Guided Latent Consistency Distillation (RG-LCD; Li, Feng,
Chen, Wang, TMLR 2024): distilled from the teacher's DDIM + classifier-free-guidance trajectory while maximising the
reward below.

## How it was made

{table}

## How to sample it

2–4 steps (1–8 work), `guidance_scale={guidance:g}`, its `LCMScheduler` (or TCD: diffusers' `TCDScheduler` on the
same grid, `eta` 0.3):

```python
{imports}
{loading}image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale={guidance:g}).images[0]
```
"""


def write_model_card(folder: str | Path, config: TrainConfig, kind: Literal["pipeline", "lora", "fused"]) -> Path:
    """``folder/README.md``: the model card of the student in ``folder``."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(config, kind, str(folder)))
    return path


def add_evaluation_to_card(folder: str | Path, table: str, about: str) -> bool:
    """Put (or replace) the evaluation section of an rglcd model card in ``folder``; False when there is none."""
    path = Path(folder) / CARD_FILE
    if not path.is_file() or CARD_MARKER not in (text := path.read_text()):
        return False
    text = text.split(f"\n{EVALUATION_HEADING}\n", 1)[0].rstrip("\n")
    path.write_text(f"{text}\n\n{EVALUATION_HEADING}\n\n{about}\n\n{table}\n")
    return True
