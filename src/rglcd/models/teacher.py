"""The teacher: loading any Stable-Diffusion-layout diffusers checkpoint, and its prompt (and SDXL) conditioning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import RglcdError
from ..schedules import NoiseSchedule
from .vae import vae_dtype, vae_scale_factor

# The components an SD-layout pipeline folder must have (model_index.json keys).
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class TeacherLoadError(RglcdError, ValueError):
    """The path or hub id is not a usable Stable-Diffusion-layout diffusers pipeline."""


@dataclass
class Teacher:
    """The frozen parts of a latent diffusion pipeline that RG-LCD distils from."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict  # the checkpoint's own scheduler config, kept for the exported LCMScheduler
    schedule: NoiseSchedule
    source: str
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder (with projection), and its tokenizer
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def encoders(self) -> list[nn.Module]:
        """The VAE and the text encoder(s)."""
        return [module for module in (self.vae, self.text_encoder, self.text_encoder_2) if module is not None]

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, unet: bool = True) -> Teacher:
        """:func:`place` the parts; ``unet=False`` leaves the UNet alone (a LoRA run's, which is the student)."""
        place(self, device, dtype, unet)
        return self


def place(parts: Any, device: torch.device | str, dtype: torch.dtype | None = None, unet: bool = True) -> None:
    """In place: a pipeline's (or :class:`Teacher`'s) UNet and text encoder(s) to ``device`` in ``dtype`` (None:
    as they are), its VAE in :func:`vae_dtype`. One ``Module.to(device, dtype)`` each casts every weight on its way,
    so no float32 copy of a model reaches the GPU before the cast, and an upcast VAE keeps its weights exactly."""
    sdxl = getattr(parts, "text_encoder_2", None) is not None
    modules = [parts.unet] if unet else []
    modules += [module for module in (parts.text_encoder, getattr(parts, "text_encoder_2", None)) if module is not None]
    verbosity = diffusers_logging.get_verbosity()
    # diffusers warns of "modules that should be kept in float32: []" on every cast, even when there are none.
    diffusers_logging.set_verbosity_error()
    try:
        for module in modules:
            module.to(device, dtype)
        parts.vae.to(device, dtype and vae_dtype(parts.vae, dtype, sdxl))
    finally:
        diffusers_logging.set_verbosity(verbosity)


def read_pipeline_index(source: str, revision: str | None) -> dict:
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file():
        raise TeacherLoadError(
            f"{source} has no model_index.json: it is not a diffusers pipeline folder. Point --teacher at the "
            "folder written by `pipeline.save_pretrained(...)` (it holds model_index.json, unet/, vae/, ...)."
        )
    try:
        return DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # hub errors come in many types; all mean the same to the user
        raise TeacherLoadError(
            f"could not read the pipeline index of {source!r} ({type(error).__name__}: {error}). "
            "Give a local diffusers pipeline folder or a hub id that is cached or reachable "
            "(offline runs need HF_HUB_OFFLINE=1 and a populated cache)."
        ) from error


def load_teacher(source: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> Teacher:
    """Load UNet, VAE, text encoder, tokenizer and noise schedule from a hub id or a local folder.

    All parts are returned frozen (``requires_grad_(False)``, eval mode) in float32 on the CPU.
    """
    source = str(source)
    index = read_sd_layout_index(source, revision)

    def load(component: str, loader):
        try:
            return loader(source, subfolder=component, revision=revision)
        except Exception as error:
            raise TeacherLoadError(
                f"could not load the {component!r} component of {source} ({type(error).__name__}: {error})"
            ) from error

    unet = load("unet", lambda s, **kw: UNet2DConditionModel.from_pretrained(s, **kw, variant=variant))
    vae = load("vae", lambda s, **kw: AutoencoderKL.from_pretrained(s, **kw, variant=variant))
    text_encoder = load("text_encoder", lambda s, **kw: CLIPTextModel.from_pretrained(s, **kw, variant=variant))
    tokenizer = load("tokenizer", AutoTokenizer.from_pretrained)
    scheduler_config = load("scheduler", lambda s, **kw: load_raw_config(DDPMScheduler, s, **kw))
    text_encoder_2 = tokenizer_2 = None
    if has_component(index, "text_encoder_2"):  # SDXL
        text_encoder_2 = load(
            "text_encoder_2", lambda s, **kw: CLIPTextModelWithProjection.from_pretrained(s, **kw, variant=variant)
        )
        tokenizer_2 = load("tokenizer_2", AutoTokenizer.from_pretrained)
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:  # float32 as documented: transformers keeps a text encoder saved in float16 as it is
            module.float().requires_grad_(False).eval()
    return Teacher(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        schedule=NoiseSchedule.from_config(scheduler_config),
        source=source,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def has_component(index: dict, name: str) -> bool:
    return bool(index.get(name)) and index[name] != [None, None]


def read_sd_layout_index(source: str, revision: str | None) -> dict:
    """The pipeline's model_index.json, checked to hold every component rglcd needs."""
    index = read_pipeline_index(source, revision)
    missing = [name for name in REQUIRED_COMPONENTS if not has_component(index, name)]
    if missing:
        raise TeacherLoadError(
            f"{source} is not a Stable-Diffusion-layout pipeline: model_index.json lacks {', '.join(missing)}. "
            f"rglcd needs {', '.join(REQUIRED_COMPONENTS)}."
        )
    return index


def load_raw_config(loader, source: str, subfolder: str, revision: str | None) -> dict:
    """A component's config.json as written, without the defaults a class would fill in or the "_" keys (for a
    scheduler: the exported LCMScheduler starts from the checkpoint's own)."""
    config = loader.load_config(source, subfolder=subfolder, revision=revision)
    return {key: value for key, value in config.items() if not key.startswith("_")}


def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
    """CLIP text embeddings as Stable Diffusion pipelines make them: [B] -> [B, L, D] (padded to max length)."""
    return text_encoder(_token_ids(tokenizer, text_encoder, prompts))[0]


def _token_ids(tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
    """Token ids [B, L] padded and truncated to the tokenizer's length, on the text encoder's device."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids.to(next(text_encoder.parameters()).device)


def encode_sdxl_prompts(tokenizers: tuple, text_encoders: tuple, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """SDXL's text conditioning as its pipelines make it: both encoders' penultimate hidden states concatenated
    [B, L, D1 + D2], and the second (projection) encoder's pooled text embedding [B, P]."""
    hidden = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        output = text_encoder(_token_ids(tokenizer, text_encoder, prompts), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), output[0]


def sdxl_time_ids(batch_size: int, height: int, width: int) -> Tensor:
    """SDXL's micro-conditioning [B, 6]: original size, crop top-left, target size; here an uncropped square
    image at the training resolution (what the pipelines pass by default)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch_size, 6)


def text_conditioning(parts: Any, prompts: list[str], resolution: int) -> tuple[Tensor, dict[str, Tensor] | None]:
    """(embeddings [B, L, D], the UNet's ``added_cond_kwargs`` or None) of ``prompts`` for a pipeline's parts
    (a :class:`Teacher` or a loaded diffusers pipeline): SD's single encoder, or SDXL's two plus the pooled
    embedding and size conditioning. SDXL's empty prompt is all zeros (``force_zeros_for_empty_prompt``), as
    its pipelines and LCM-SDXL's distillation use."""
    if getattr(parts, "text_encoder_2", None) is None:
        return encode_prompts(parts.tokenizer, parts.text_encoder, prompts), None
    embeds, pooled = encode_sdxl_prompts(
        (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2), prompts
    )
    empty = [index for index, prompt in enumerate(prompts) if not prompt]
    if empty:
        embeds[empty], pooled[empty] = 0.0, 0.0
    return embeds, sdxl_added_cond(pooled, resolution)


def sdxl_added_cond(pooled: Tensor, resolution: int) -> dict[str, Tensor]:
    """SDXL's ``added_cond_kwargs`` from the pooled text embeddings [B, P]: those and the size conditioning."""
    return {"text_embeds": pooled, "time_ids": sdxl_time_ids(len(pooled), resolution, resolution).to(pooled)}
