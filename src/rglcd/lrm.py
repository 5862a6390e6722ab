"""``rglcd lrm pretrain``: a latent proxy RM trained contrastively (CLIP's loss) on a dataset's VAE latents.

The latents come from an ``rglcd cache`` folder (the teacher's VAE posteriors and the captions, made once, the
same cache ``rglcd train`` reads); training draws a fresh posterior sample per step, like the distillation does.
The LRM is saved to ``OUT`` (config.json + model.safetensors) with its training record and a held-out retrieval
accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from open_clip.loss import ClipLoss
from torch import Tensor

from .data import CachedStream, DataError, read_cache_info
from .fitting import adamw_without_decay_on_gains, fit, warmup_cosine
from .rewards.latent import LATENT_RN50, WORLD_LATENT_CLIP, LatentClip, LatentClipConfig

ARCHITECTURES = {"latent-rn50": LATENT_RN50, "world": WORLD_LATENT_CLIP}


@dataclass
class PretrainSettings:
    architecture: str = "latent-rn50"
    samples: int = 10_000  # read from the cache; the last ``heldout`` are kept for the retrieval check
    heldout: int = 512
    steps: int = 2_000
    batch_size: int = 128
    learning_rate: float = 5e-4  # the official latent_RN50 run's
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"  # where the proxy trains ("cuda", ...); the latents stay in RAM


def read_latents(cache: str | Path, samples: int) -> tuple[Tensor, Tensor, list[str]]:
    """(posterior means, stds [N, C, h, w], captions) of the first ``samples`` entries of an ``rglcd cache``
    folder, in its order. They are held in memory: N·2·C·h·w floats (about 26 GB for 200,000 SD latents at
    512 px)."""
    available = read_cache_info(cache)["samples"]
    if available < samples:
        raise DataError(f"{cache} holds {available} samples, not {samples}: lower --samples or cache more")
    parameters, captions = [], []
    for batch in CachedStream(cache, batch_size=min(64, samples)):  # in order: no shuffle, no caption dropout
        parameters.append(batch["latent_parameters"])  # [B, 2C, h, w]: mean, log-variance
        captions += batch["captions"]
        if len(captions) >= samples:
            break
    posterior = DiagonalGaussianDistribution(torch.cat(parameters)[:samples])
    return posterior.mean, posterior.std, captions[:samples]


RETRIEVAL_GROUP = 32


def retrieval_accuracy(model: LatentClip, latents: Tensor, captions: list[str], group: int = RETRIEVAL_GROUP) -> float:
    """Fraction of latents whose own caption scores highest among ``group`` captions (chance: 1/group)."""
    hits = 0
    with torch.no_grad():
        for start in range(0, len(latents) - group + 1, group):
            image = model.encode_images(latents[start : start + group].to(model.clip.logit_scale.device))  # [G, D]
            text = model.encode_prompts(captions[start : start + group])  # [G, D]
            hits += ((image @ text.T).argmax(dim=1).cpu() == torch.arange(len(image))).sum().item()
    return hits / (len(latents) // group * group)


def pretrain_lrm(out: str | Path, cache: str | Path, settings: PretrainSettings, progress: bool = True) -> LatentClip:
    """Train a latent CLIP on the latents of an ``rglcd cache`` folder and save it to ``out``."""
    if settings.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown LRM architecture {settings.architecture!r}; one of {', '.join(ARCHITECTURES)}")
    if not RETRIEVAL_GROUP <= settings.heldout < settings.samples:
        raise ValueError(
            f"heldout ({settings.heldout}) must be at least {RETRIEVAL_GROUP} and below samples ({settings.samples})"
        )
    started = time.perf_counter()
    out = Path(out)
    mean, std, captions = read_latents(cache, settings.samples)
    config: LatentClipConfig = replace(
        ARCHITECTURES[settings.architecture], latent_size=mean.shape[-1], latent_channels=mean.shape[1]
    )
    train_count = settings.samples - settings.heldout

    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = LatentClip(config).to(settings.device)
    tokens = model.tokenize(captions[:train_count])  # [N, context_length], once
    loss_fn = ClipLoss()

    def batch_loss() -> Tensor:
        chosen = torch.randint(train_count, (settings.batch_size,), generator=generator)
        chosen_mean = mean[chosen]  # [B, C, h, w]
        latents = chosen_mean + std[chosen] * torch.randn(chosen_mean.shape, generator=generator)
        image = model.encode_images(latents.to(settings.device))
        text = model.clip.encode_text(tokens[chosen].to(settings.device), normalize=True)
        return loss_fn(image, text, model.clip.logit_scale.exp())

    def cap_temperature(step: int) -> None:
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            model.clip.logit_scale.clamp_(0, math.log(100))

    optimizer = adamw_without_decay_on_gains(model, settings.learning_rate, settings.weight_decay)
    model.train()
    losses = fit(
        batch_loss,
        settings.steps,
        optimizer,
        warmup_cosine(optimizer, settings.steps),
        desc="LRM pretrain",
        progress=progress,
        after_step=cap_temperature,
    )
    model.eval()
    accuracy = retrieval_accuracy(model, mean[train_count:], captions[train_count:])
    record = {
        **vars(settings),
        "cache": str(cache),
        "teacher": read_cache_info(cache)["teacher"],
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_retrieval_accuracy": round(accuracy, 4),
    }
    model.cpu().save_pretrained(out, record)
    return model.requires_grad_(False)
