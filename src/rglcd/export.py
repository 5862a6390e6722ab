"""The student as diffusers folders: an LCM pipeline, LoRA weights (and the teacher's pipeline with them fused),
and loading an exported LCM back for sampling."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft.utils import get_peft_model_state_dict
from torch import nn

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
    with atomic_folder(out_dir) as partial:
        pipeline.save_pretrained(partial)
    return out_dir


def load_lcm(model: str | Path, device: str | torch.device = "cpu"):
    """Load an exported (or any diffusers LCM) pipeline folder or hub id; errors name what is wrong."""
    index = read_pipeline_index(str(model), revision=None)
    if "unet" not in index or "vae" not in index:
        raise TeacherLoadError(f"{model} is not a UNet latent diffusion pipeline (model_index.json: {sorted(index)})")
    pipeline = DiffusionPipeline.from_pretrained(str(model))
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
    return pipeline.to(device)


def save_lora(unet: nn.Module, folder: str | Path, adapter: str = STUDENT, sdxl: bool = False) -> Path:
    """One adapter as diffusers LoRA weights (``folder/pytorch_lora_weights.safetensors``), for an SD or SDXL
    pipeline's ``load_lora_weights``."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter)  # PEFT keys, which load_lora_weights reads
    # The file carries no alpha, and loaders take alpha = rank (scaling 1): fold alpha / rank into B.
    config = unet.peft_config[adapter]
    scaling = config.lora_alpha / config.r
    state = {key: value * scaling if ".lora_B." in key else value for key, value in state.items()}
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    with atomic_folder(folder) as partial:
        pipeline_class.save_lora_weights(partial, unet_lora_layers=state, safe_serialization=True)
    return Path(folder)


def export_fused(
    teacher: str,
    lora_folder: str | Path,
    out_dir: str | Path,
    num_ddim_timesteps: int,
    timestep_scaling: float,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """The teacher's pipeline with the adapters fused into its UNet and an LCMScheduler, written atomically:
    ``DiffusionPipeline.from_pretrained(out_dir)`` samples in a few steps without peft."""
    # The weights distilled from (revision, variant); SD's safety checker is not part of the student.
    optional = {
        name: None for name in ("safety_checker", "feature_extractor") if name in read_pipeline_index(teacher, revision)
    }
    pipeline = DiffusionPipeline.from_pretrained(teacher, revision=revision, variant=variant, **optional)
    pipeline.load_lora_weights(str(lora_folder))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    pipeline.scheduler = lcm_scheduler(dict(pipeline.scheduler.config), num_ddim_timesteps, timestep_scaling)
    with atomic_folder(out_dir) as partial:
        pipeline.save_pretrained(partial)
    return Path(out_dir)
