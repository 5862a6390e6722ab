"""The world teacher: a tiny Stable-Diffusion-layout pipeline trained by the package on rendered scenes.

``train_world_teacher`` first fits the autoencoder (AutoencoderKL, 32×32×3 ↔ 8×8×4), then the
text-conditional diffusion model (CLIPTextModel + UNet2DConditionModel, trained together, captions dropped
10% of the time for classifier-free guidance), and saves a standard StableDiffusionPipeline folder that
``rglcd train`` loads like Stable Diffusion itself.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from ..architectures import clip_tokenizer
from ..fitting import fit
from ..tiny import clip_text_encoder, sd_pipeline, sd_scheduler
from .paths import TEACHER_SEED
from .render import render, scenes

CONTEXT_LENGTH = 32


@dataclass
class TeacherRecipe:
    prediction_type: str = "epsilon"
    samples: int = 20_000
    vae_steps: int = 1_500
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-5
    unet_steps: int = 6_000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = TEACHER_SEED


def render_dataset(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered scenes as uint8 [N,3,32,32] and their captions."""
    drawn = scenes(seed, count)
    pixels = np.stack([np.asarray(render(scene)) for scene in drawn])  # [N, 32, 32, 3]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [scene.caption for scene in drawn]


def build_components(prediction_type: str):
    """Untrained VAE, text encoder, tokenizer, UNet and scheduler of the world teacher."""
    tokenizer = clip_tokenizer(CONTEXT_LENGTH)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=16,
    )
    return vae, text_encoder, tokenizer, unet, sd_scheduler(prediction_type)


def _to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def train_autoencoder(vae, pixels: torch.Tensor, recipe: TeacherRecipe, generator: torch.Generator, progress: bool):
    """L1 + L2 reconstruction with a small KL term; returns the latent scaling factor 1/std."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.vae_steps)

    def batch_loss() -> torch.Tensor:
        index = torch.randint(0, len(pixels), (recipe.vae_batch_size,), generator=generator)
        images = _to_model_range(pixels[index])
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        return (
            F.l1_loss(reconstruction, images)
            + F.mse_loss(reconstruction, images)
            + recipe.kl_weight * posterior.kl().mean()
        )

    vae.train()
    fit(batch_loss, recipe.vae_steps, optimizer, schedule, desc="world teacher: autoencoder", progress=progress)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = _to_model_range(pixels[:2048])
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)])
    return float(1.0 / latents.std())


def train_world_teacher(out: str | Path, recipe: TeacherRecipe | None = None, progress: bool = True) -> Path:
    """Train the world teacher and save it as a StableDiffusionPipeline folder at ``out``."""
    recipe = recipe or TeacherRecipe()
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    vae, text_encoder, tokenizer, unet, scheduler = build_components(recipe.prediction_type)
    started = time.perf_counter()
    pixels, captions = render_dataset(recipe.seed, recipe.samples)

    scaling_factor = train_autoencoder(vae, pixels, recipe, generator, progress)
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():  # the posterior of every image, once: [N, 8, 8, 8] (mean and log-variance)
        moments = torch.cat([vae.encode(_to_model_range(chunk)).latent_dist.parameters for chunk in pixels.split(512)])
    token_ids = tokenizer(
        captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids

    alphas_cumprod = scheduler.alphas_cumprod

    def batch_loss() -> torch.Tensor:
        index = torch.randint(0, len(pixels), (recipe.unet_batch_size,), generator=generator)
        mean, logvar = moments[index].chunk(2, dim=1)
        z0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)) * scaling_factor
        ids = token_ids[index].clone()
        dropped = torch.rand(len(ids), generator=generator) < recipe.caption_dropout
        ids[dropped] = empty_ids
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(ids),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        zt = alpha * z0 + sigma * noise
        target = noise if recipe.prediction_type == "epsilon" else alpha * noise - sigma * z0
        prediction = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        return F.mse_loss(prediction, target)

    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)

    def update_ema(step: int) -> None:
        # EMA weights sample far better than the last iterate of a small, briefly trained model.
        decay_now = min(recipe.ema_decay, (1 + step) / (10 + step))
        for ema, online in ((ema_unet, unet), (ema_text, text_encoder)):
            for ema_parameter, parameter in zip(ema.parameters(), online.parameters(), strict=True):
                ema_parameter.lerp_(parameter.detach(), 1 - decay_now)

    optimizer = torch.optim.AdamW(
        [*unet.parameters(), *text_encoder.parameters()], lr=recipe.unet_learning_rate, weight_decay=0.01
    )
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, total_iters=500)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(recipe.unet_steps - 500, 1))
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[500])
    unet.train()
    text_encoder.train()
    fit(
        batch_loss,
        recipe.unet_steps,
        optimizer,
        schedule,
        desc="world teacher: diffusion",
        progress=progress,
        max_grad_norm=1.0,
        after_step=update_ema,
    )

    pipeline = sd_pipeline(vae, ema_text.eval(), tokenizer, ema_unet.eval(), scheduler)
    out = Path(out)
    pipeline.save_pretrained(out)
    (out / "recipe.json").write_text(_recipe_json(recipe, time.perf_counter() - started))
    return out


def _recipe_json(recipe: TeacherRecipe, seconds: float) -> str:
    return json.dumps({**asdict(recipe), "training_seconds": round(seconds, 1)}, indent=2)
