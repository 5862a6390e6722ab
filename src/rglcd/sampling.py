"""Sampling: multistep latent consistency sampling (LCM Alg. 2 / RG-LCD Alg. 2), the teacher's DDIM + CFG, images.

Every sampler is called alike: ``sample(unet, vae, text, scheduler, prompts, *, num_steps, guidance_scale, generator,
resolution)``, then its own options (TCD's ``eta``), with the scheduler from :func:`lcm_scheduler`,
:func:`consistency_scheduler` or :func:`ddim_scheduler`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor, nn

from .grid import labelled_grid
from .models import decode_latents, text_conditioning, vae_scale_factor
from .schedules import guidance_scale_embedding


def _scheduler_from(scheduler_class, scheduler_config: dict, **overrides):
    """``scheduler_class`` from another scheduler's config, keeping only the keys it accepts."""
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return scheduler_class.from_config({k: v for k, v in scheduler_config.items() if k in accepted}, **overrides)


def image_size(unet, vae, resolution: int | None) -> int:
    """The requested resolution, else the UNet's native one (its sample size × the VAE's factor)."""
    return resolution or unet.config.sample_size * vae_scale_factor(vae.config)


def _conditioning(text: Any, prompts: list[str], size: int, dtype):
    """Prompt embeddings and SDXL's added conditions (or None), in the UNet's dtype."""
    embeds, added = text_conditioning(text, prompts, size)
    return embeds.to(dtype), None if added is None else {key: value.to(dtype) for key, value in added.items()}


def _initial_latents(unet, vae, batch_size: int, resolution: int | None, generator, dtype, init_noise_sigma: float):
    """Gaussian latents [B, C, R/f, R/f] drawn as diffusers' pipelines draw them (same generator order)."""
    size = image_size(unet, vae, resolution) // vae_scale_factor(vae.config)
    shape = (batch_size, unet.config.in_channels, size, size)
    device = next(unet.parameters()).device
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * init_noise_sigma


def lcm_scheduler(scheduler_config: dict, num_ddim_timesteps: int = 50, timestep_scaling: float = 10.0):
    """diffusers' LCMScheduler over the distillation grid, from the teacher's own scheduler config."""
    return _scheduler_from(
        LCMScheduler,
        scheduler_config,
        original_inference_steps=num_ddim_timesteps,
        timestep_scaling=timestep_scaling,
        # LCM denoises latents, which must never be clipped to the pixel range.
        clip_sample=False,
        thresholding=False,
    )


SAMPLERS = ("lcm", "tcd")
TCD_ETA = 0.3  # diffusers' TCDScheduler default γ
LCM_GUIDANCE = 8.5  # diffusers' LatentConsistencyModelPipeline default
TEACHER_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default
TEACHER_STEPS = 50  # diffusers' StableDiffusionPipeline default


def consistency_scheduler(scheduler_config: dict, sampler: str = "lcm"):
    """An exported student's sampler over its grid: its LCMScheduler (``lcm``), or diffusers' TCDScheduler (``tcd``;
    Zheng et al. 2024's strategic stochastic sampling, whose γ = ``eta`` sets how much fresh noise each step adds)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return _scheduler_from(LCMScheduler if sampler == "lcm" else TCDScheduler, dict(scheduler_config))


def ddim_scheduler(scheduler_config: dict):
    """The teacher's sampler: DDIM over the checkpoint's own schedule and spacing, as a diffusers pipeline would run
    it, from its scheduler config; latents are never clipped."""
    return _scheduler_from(DDIMScheduler, scheduler_config, clip_sample=False)


@torch.no_grad()
def lcm_sample(
    unet: nn.Module,
    vae: nn.Module,
    text: Any,
    scheduler: Any,
    prompts: list[str],
    *,
    num_steps: int = 4,
    guidance_scale: float = LCM_GUIDANCE,
    generator: torch.Generator | list[torch.Generator] | None = None,
    resolution: int | None = None,
    eta: float = TCD_ETA,
) -> Tensor:
    """Images [B,3,H,W] in [0,1] from a consistency model in ``num_steps`` steps. ``text`` holds the tokenizer(s)
    and text encoder(s): a diffusers pipeline or a :class:`Teacher` (SD's one, or SDXL's two).

    ``guidance_scale`` is the CFG scale as in diffusers' pipelines; the model sees emb(guidance_scale − 1),
    the LCM-convention w it was distilled with (a LoRA student has no such input and ignores it). Noise is
    drawn in the same order as diffusers' LatentConsistencyModelPipeline, so for one generator both give the
    same images. ``scheduler``: an LCMScheduler or a TCDScheduler (:func:`consistency_scheduler`), which takes
    ``eta``, its γ; with a TCDScheduler the images equal diffusers' StableDiffusionPipeline's with that scheduler.
    """
    device = next(unet.parameters()).device
    step_options = {"eta": eta} if isinstance(scheduler, TCDScheduler) else {}
    prompt_embeds, added = _conditioning(text, prompts, image_size(unet, vae, resolution), unet.dtype)
    latents = _initial_latents(
        unet, vae, len(prompts), resolution, generator, prompt_embeds.dtype, scheduler.init_noise_sigma
    )

    scheduler.set_timesteps(num_steps, device=device)
    w_embedding = None  # a LoRA student (no guidance input) samples as diffusers does at guidance_scale ≤ 1
    if unet.config.time_cond_proj_dim is not None:
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        w_embedding = guidance_scale_embedding(w, unet.config.time_cond_proj_dim).to(device, latents.dtype)
    denoised = latents
    for timestep in scheduler.timesteps:
        model_output = unet(
            latents, timestep, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding, added_cond_kwargs=added
        ).sample
        # LCM's scheduler applies c_skip/c_out (the consistency function) and, between steps, re-noises the denoised
        # estimate to the next timestep of the grid; TCD's moves it to s = ⌊(1 − γ)·t_next⌋ along the predicted noise,
        # then re-noises to t_next. At the last step both return the final estimate second.
        latents, denoised = scheduler.step(
            model_output, timestep, latents, generator=generator, return_dict=False, **step_options
        )
    return decode_latents(vae, denoised)  # in the VAE's dtype: an upcast VAE decodes float32 latents


@torch.no_grad()
def ddim_cfg_sample(
    unet: nn.Module,
    vae: nn.Module,
    text: Any,
    scheduler: Any,
    prompts: list[str],
    *,
    num_steps: int = TEACHER_STEPS,
    guidance_scale: float = TEACHER_GUIDANCE,
    generator: torch.Generator | list[torch.Generator] | None = None,
    resolution: int | None = None,
) -> Tensor:
    """The teacher's baseline: DDIM (η = 0) with classifier-free guidance, images [B,3,H,W] in [0,1]. Called as
    :func:`lcm_sample` is: ``text`` holds the tokenizer(s) and text encoder(s), ``scheduler`` is the sampler's
    (:func:`ddim_scheduler`).

    ``guidance_scale`` is the CFG scale s of ε̂ = ε_∅ + s·(ε_c − ε_∅), as in diffusers' pipelines.
    """
    device = next(unet.parameters()).device
    size = image_size(unet, vae, resolution)
    cond, added = _conditioning(text, prompts, size, unet.dtype)
    uncond, uncond_added = _conditioning(text, [""] * len(prompts), size, unet.dtype)
    both_added = None if added is None else {key: torch.cat([uncond_added[key], added[key]]) for key in added}
    latents = _initial_latents(unet, vae, len(prompts), resolution, generator, cond.dtype, scheduler.init_noise_sigma)
    scheduler.set_timesteps(num_steps, device=device)
    for timestep in scheduler.timesteps:
        output_uncond, output_cond = unet(
            torch.cat([latents, latents]), timestep, encoder_hidden_states=torch.cat([uncond, cond]),
            added_cond_kwargs=both_added,
        ).sample.chunk(2)  # fmt: skip
        output = output_uncond + guidance_scale * (output_cond - output_uncond)
        latents = scheduler.step(output, timestep, latents).prev_sample
    return decode_latents(vae, latents)


def to_pil(images: Tensor) -> list:
    """[B,3,H,W] in [0,1] -> PIL images, rounded to uint8 as diffusers' image processor does."""
    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def save_grid(rows: list[Tensor], path: str | Path, column_labels: list[str], row_labels: list[str]) -> None:
    """Save rows of [B,3,H,W] images in [0,1] as one labelled PNG (``grid.labelled_grid``)."""
    labelled_grid([to_pil(images) for images in rows], column_labels, row_labels).save(path)
