"""VAE helpers: the latent scale, and decoding latents to images."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent along a side: 2^(number of VAE blocks − 1) (8 for SD and SDXL)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_dtype(vae: nn.Module, dtype: torch.dtype, sdxl: bool) -> torch.dtype:
    """The VAE's dtype when the rest of a pipeline runs in ``dtype``: float32 for an SDXL VAE with
    ``vae.config.force_upcast`` (SDXL's overflows float16 into NaN images, so diffusers' SDXL pipelines upcast it;
    its weights are kept whole under bfloat16 too; the fp16-fix VAE has the flag off). SD 1.x/2.x pipelines never
    read the flag (their configs default it on), and their VAEs run in ``dtype``."""
    upcast = sdxl and dtype != torch.float32 and vae.config.get("force_upcast", False)
    return torch.float32 if upcast else dtype


def decode_latents(vae: nn.Module, latents: Tensor, batch_size: int = 0) -> Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (differentiable).

    ``batch_size`` > 0 decodes in micro-batches of that size, bounding the decoder's peak memory. A float32 VAE runs
    in float32 also inside float16 autocast (the training step's): an upcast VAE (:func:`vae_dtype`) would
    overflow there just the same.
    """
    chunks = latents.split(batch_size) if batch_size > 0 else (latents,)
    device = latents.device.type
    fp16_autocast = (
        torch.amp.is_autocast_available(device)  # (not the meta device's)
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.float16
    )
    upcast = fp16_autocast and vae.dtype == torch.float32
    with torch.autocast(device, enabled=False) if upcast else contextlib.nullcontext():
        images = torch.cat([vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor).sample for chunk in chunks])
    return (images.float() / 2 + 0.5).clamp(0, 1)


def reward_input(vae: nn.Module, on_latents: bool = False, decode_batch_size: int = 0) -> Callable[[Tensor], Tensor]:
    """What a reward reads of the one-step prediction ẑ_0 (scaled latents [B, C, h, w]): the decoded images
    [B, 3, H, W] in [0, 1] (Alg. 3), or with ``on_latents`` the unscaled latents (Alg. 4's latent proxy RM)."""
    if on_latents:
        return lambda latents: latents / vae.config.scaling_factor
    return lambda latents: decode_latents(vae, latents, decode_batch_size)
