"""``rglcd lrm pretrain``: a latent proxy RM trained contrastively (CLIP's loss) on a dataset's VAE latents.

The teacher's VAE encodes the images once into ``OUT/latent_cache.safetensors`` (posterior means and standard
deviations, with the captions), which later runs reuse; training then draws a fresh posterior sample per step,
like the distillation does. The LRM is saved to ``OUT`` (config.json + model.safetensors) with its training
record and a held-out retrieval accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .fitting import adamw_without_decay_on_gains, fit, warmup_cosine
from .rewards.latent import LATENT_RN50, WORLD_LATENT_CLIP, LatentClip, LatentClipConfig

ARCHITECTURES = {"latent-rn50": LATENT_RN50, "world": WORLD_LATENT_CLIP}
CACHE_FILE = "latent_cache.safetensors"
CAPTIONS_FILE = "latent_cache_captions.json"


@dataclass
class PretrainSettings:
    architecture: str = "latent-rn50"
    resolution: int = 512
    samples: int = 10_000  # encoded once; the last ``heldout`` are kept for the retrieval check
    heldout: int = 512
    steps: int = 2_000
    batch_size: int = 128
    learning_rate: float = 5e-4  # the official latent_RN50 run's
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"  # where the VAE encodes and the proxy trains ("cuda", ...); the latents stay in RAM


def encode_dataset(
    teacher: str, source: str, resolution: int, samples: int, out: Path, device: str = "cpu", progress: bool = True
) -> tuple[Tensor, Tensor, list[str]]:
    """(means, stds [N, C, h, w], captions) of the first ``samples`` images of ``source`` (which should hold at
    least that many: a stream that wraps around repeats images), cached in ``out`` and reused only for the same
    teacher, source and resolution. They are held in memory: N·2·C·h·w floats (about 26 GB for 200,000 SD
    latents at 512 px)."""
    cache, captions_file = out / CACHE_FILE, out / CAPTIONS_FILE
    made_by = {"teacher": str(teacher), "source": str(source), "resolution": resolution}
    if cache.is_file() and captions_file.is_file():
        record = json.loads(captions_file.read_text())
        if {key: record.get(key) for key in made_by} == made_by and len(record["captions"]) >= samples:
            tensors = load_file(cache)
            return tensors["mean"][:samples], tensors["std"][:samples], record["captions"][:samples]
    from .data import TrainStream
    from .models import load_teacher

    vae = load_teacher(teacher).vae.eval().to(device)
    stream = TrainStream(source, resolution=resolution, batch_size=64, shuffle_buffer=0, seed=0)
    means, stds, captions = [], [], []
    with torch.no_grad(), tqdm(total=samples, desc="encode latents", disable=not progress) as bar:
        for batch in stream:
            posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
            bar.update(min(len(batch["captions"]), samples - len(captions)))
            captions += batch["captions"]
            if len(captions) >= samples:
                break
    mean, std = torch.cat(means)[:samples], torch.cat(stds)[:samples]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, cache)
    captions_file.write_text(json.dumps({**made_by, "captions": captions[:samples]}))
    return mean, std, captions[:samples]


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


def pretrain_lrm(
    out: str | Path, teacher: str, source: str, settings: PretrainSettings, progress: bool = True
) -> LatentClip:
    """Train a latent CLIP on ``source``'s latents (VAE of ``teacher``) and save it to ``out``."""
    from open_clip.loss import ClipLoss

    if settings.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown LRM architecture {settings.architecture!r}; one of {', '.join(ARCHITECTURES)}")
    if not RETRIEVAL_GROUP <= settings.heldout < settings.samples:
        raise ValueError(
            f"heldout ({settings.heldout}) must be at least {RETRIEVAL_GROUP} and below samples ({settings.samples})"
        )
    started = time.perf_counter()
    out = Path(out)
    mean, std, captions = encode_dataset(
        teacher, source, settings.resolution, settings.samples, out, settings.device, progress
    )
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
        "teacher": str(teacher),
        "source": str(source),
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_retrieval_accuracy": round(accuracy, 4),
    }
    model.cpu().save_pretrained(out, record)
    return model.requires_grad_(False)
