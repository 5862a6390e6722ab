"""The world's learned rewards, trained here on rendered scenes: a tiny CLIP and a vividness CNN.

* ``world-clip`` (:class:`WorldClip`): an open_clip CLIP (ViT and text transformer, both tiny) trained
  contrastively on (image, caption) pairs; the score is the cosine between the normalised image and text
  embeddings, as HPSv2 defines it. It plays HPSv2, CLIPScore and PickScore.
* ``world-aesthetic`` (:class:`WorldAesthetic`): a small CNN regressing the colourfulness of clean renders. It
  plays the pixel-space reward models that direct optimisation exploits with high-frequency noise.

Both save a folder of ``model.safetensors`` and ``config.json``. Without an explicit folder they load
``cache_dir()/world/<name>``, else the shipped ``shipped_dir()/<name>``; ``rglcd world rewards`` trains them.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fitting import adamw_without_decay_on_gains, fit, warmup_cosine
from ..metrics import high_frequency_share
from ..rewards.base import RewardModel, register_reward
from ..rewards.clip import CLIP_MEAN, CLIP_STD, ClipScorer, small_open_clip
from ..rewards.pixel import Colorfulness
from ..rewards.weights import load_model_weights, read_model_config, save_model_folder
from .paths import REWARD_SEED, world_asset
from .render import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, Scene, render_batch, scenes

VOCAB_SIZE = 49408  # OpenAI CLIP's BPE vocabulary, shipped in open_clip's wheel
TRAIN_COMMAND = "rglcd world rewards"
MAKE_THEM = f"run `{TRAIN_COMMAND}` to train it"
# Colourfulness of [0, 1] renders is about 0.09-0.40 (mean 0.24); dividing by this puts the target near 1.
COLOURFULNESS_SCALE = 0.25


# --------------------------------------------------------------------------------------------- weights on disk


def resolve_weights(weights: str | Path | None, name: str) -> Path:
    """``weights`` if given, else the world asset ``name``: ``cache_dir()/world/<name>``, else the shipped one."""
    if weights is None:
        try:
            return world_asset(name)
        except FileNotFoundError as missing:
            raise FileNotFoundError(f"{missing}; run `{TRAIN_COMMAND}` to train them") from None
    folder = Path(weights)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no world-{name} weights: {folder} is not a folder; run `{TRAIN_COMMAND}` or pass a trained folder"
        )
    return folder


def _save(
    model: nn.Module, out: str | Path, kind: str, config: WorldClipConfig | WorldAestheticConfig, training: dict | None
) -> Path:
    return save_model_folder(model, out, kind, asdict(config), training)


def _weights_and_config(weights, config, name: str, config_class):
    """(trained folder or None, config): a folder's own config, or the given one for an untrained model."""
    if weights is not None and config is not None:
        raise ValueError("pass weights (a trained folder) or config (an untrained model), not both")
    if config is not None:
        return None, config
    folder = resolve_weights(weights, name)
    return folder, config_class(**read_model_config(folder, f"world-{name}", MAKE_THEM))


# ------------------------------------------------------------------------------------------------ shared helpers


def resize(images: Tensor, size: int) -> Tensor:
    """Bicubic, antialiased resize to ``size``², as PIL does it, differentiably; a no-op at that size already."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(count, 1, 1, 1, generator=generator)


def _save_trained(model, out: str | Path, recipe: dict, started: float, losses: list[float]):
    """Save a trained reward with its recipe, wall time and loss curve; return it frozen."""
    seconds = round(time.perf_counter() - started, 1)
    model.save(out, {**recipe, "seconds": seconds, "loss_curve": _loss_curve(losses)})
    return model.freeze()


def _loss_curve(losses: list[float], points: int = 50) -> list[float]:
    """Mean loss over ``points`` consecutive blocks of steps: the shape of training without every step."""
    blocks = np.array_split(np.asarray(losses), min(points, len(losses)))
    return [round(float(block.mean()), 5) for block in blocks]


# -------------------------------------------------------------------------------------------------- world-clip


@dataclass(frozen=True)
class WorldClipConfig:
    image_size: int = 32
    # 4×4 patches of 8 px; a small shape spans about 2×2 of them. Patches of 4 px made a step about 3× slower
    # without better held-out accuracy.
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 16  # 4 heads
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 32  # captions are at most 15 tokens
    embed_dim: int = 64


@register_reward("world-clip")
class WorldClip(ClipScorer):
    """A tiny CLIP of the world scoring ``cos(image embedding, caption embedding)`` in [-1, 1], like HPSv2.

    ``WorldClip(weights)`` loads a trained folder (see :func:`resolve_weights` for the default);
    ``WorldClip(config=WorldClipConfig())`` builds an untrained one, which is where training starts.
    """

    def __init__(self, weights: str | Path | None = None, *, config: WorldClipConfig | None = None):
        super().__init__()
        folder, config = _weights_and_config(weights, config, "clip", WorldClipConfig)
        self.config = config
        self.clip = small_open_clip(
            config, vision_layers=config.vision_layers, image_size=config.image_size, vocab_size=VOCAB_SIZE
        )
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        if folder is not None:
            load_model_weights(self, folder, MAKE_THEM)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0, 1] -> the ViT's input: resized to its image size and CLIP-normalised."""
        return (resize(images.float(), self.config.image_size) - self.mean) / self.std

    def save(self, out: str | Path, training: dict | None = None) -> Path:
        return _save(self, out, "world-clip", self.config, training)


def _shift_and_jitter(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Light augmentation that keeps every attribute: sub-pixel shifts of up to a pixel (positions are 8 px
    apart), brightness ×0.85-1.15 (colours keep their ratios) and faint noise (generated images are not clean).
    """
    images = pixels.float() / 255
    count, _, height, _ = images.shape
    theta = torch.eye(2, 3).repeat(count, 1, 1)
    theta[:, :, 2] = (torch.rand(count, 2, generator=generator) * 2 - 1) * 2 / height  # ±1 px in [-1, 1] units
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    images = images * _uniform(count, 0.85, 1.15, generator)
    images = images + _uniform(count, 0.0, 0.03, generator) * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def train_world_clip(
    out: str | Path,
    *,
    samples: int = 20_000,
    steps: int = 250,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    seed: int = REWARD_SEED,
    config: WorldClipConfig | None = None,
    progress: bool = True,
) -> WorldClip:
    """Train world-clip with symmetric InfoNCE on ``samples`` rendered scenes, save it to ``out``, return it frozen.

    Captions that name the same objects (the same attributes, possibly in other words) are all positives of an
    image: the target of each row is spread evenly over them, so the loss never pushes true captions apart.
    """
    started = time.perf_counter()
    drawn = scenes(seed, samples)
    pixels = render_batch(drawn)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = WorldClip(config=config or WorldClipConfig())
    tokens = model.tokenize([scene.caption for scene in drawn])
    objects: dict[tuple, int] = {}  # one group per set of objects
    groups = torch.tensor([objects.setdefault(scene.objects, len(objects)) for scene in drawn])
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> Tensor:
        index = torch.randint(samples, (batch_size,), generator=generator)
        images = model.preprocess(_shift_and_jitter(pixels[index], generator))
        image_embeddings = model.clip.encode_image(images, normalize=True)
        text_embeddings = model.clip.encode_text(tokens[index], normalize=True)
        logits = model.clip.logit_scale.exp() * image_embeddings @ text_embeddings.T
        positives = (groups[index, None] == groups[None, index]).float()
        targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def cap_temperature(step: int) -> None:
        with torch.no_grad():  # CLIP's cap on the temperature
            model.clip.logit_scale.clamp_(0, math.log(100))

    optimiser = adamw_without_decay_on_gains(model, learning_rate, weight_decay=0.1)
    model.train()
    losses = fit(
        batch_loss,
        steps,
        optimiser,
        warmup_cosine(optimiser, steps),
        desc="world-clip",
        progress=progress,
        max_grad_norm=1.0,
        after_step=cap_temperature,
    )
    recipe = {"samples": samples, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate}
    return _save_trained(model, out, {**recipe, "seed": seed}, started, losses)


def swap_attribute(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """The scene's caption, same wording, with one attribute of one object changed; and that attribute's name.

    Every template writes ``<colour> <shape>`` per object (left object first), single shapes
    ``<size> <colour> <shape>``, and a scene's colours differ: the colour word locates an object's words. In
    two-shape scenes the position changes by the objects trading places in the caption.
    """
    words = scene.caption.split()
    pair = len(scene.objects) == 2
    attribute = rng.choice(("colour", "shape", "position") if pair else ("colour", "shape", "size", "position"))
    target = rng.choice(scene.objects)
    at = words.index(target.colour)
    if attribute == "colour":
        words[at] = rng.choice([c for c in COLOURS if c not in {shape.colour for shape in scene.objects}])
    elif attribute == "shape":
        words[at + 1] = rng.choice([s for s in SHAPES if s != target.shape])
    elif attribute == "size":
        words[at - 1] = "large" if target.size == "small" else "small"
    elif pair:
        left, right = (words.index(shape.colour) for shape in scene.objects)
        words[left : left + 2], words[right : right + 2] = words[right : right + 2], words[left : left + 2]
    else:
        phrase = next(p for p in POSITION_PHRASES[target.position] if p in scene.caption)
        elsewhere = rng.choice([p for p in POSITIONS if p != target.position])
        swapped = scene.caption.replace(phrase, rng.choice(POSITION_PHRASES[elsewhere]))
        return swapped, attribute
    # The new word may change the article: "a red" <-> "an orange".
    caption = re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m[2] in "aeiou" else "a ") + m[2], " ".join(words))
    return caption, attribute


@torch.no_grad()
def evaluate_world_clip(model: WorldClip, *, count: int = 512, seed: int = REWARD_SEED + 1) -> dict[str, float]:
    """Held-out figures on ``count`` fresh scenes.

    ``swap_accuracy``: how often the true caption outscores the same caption with one attribute changed
    (overall and per attribute). ``retrieval_top1``: how often an image's best caption among all ``count`` names
    its objects. ``matched`` / ``mismatched``: mean score of true pairs / of pairs whose objects differ.
    """
    drawn = scenes(seed, count)
    rng = random.Random(seed)
    swaps = [swap_attribute(scene, rng) for scene in drawn]
    images = model.encode_images(render_batch(drawn).float() / 255)
    texts = model.encode_prompts([scene.caption for scene in drawn])
    swapped = model.encode_prompts([caption for caption, _ in swaps])
    wins = (images * texts).sum(-1) > (images * swapped).sum(-1)
    scores = images @ texts.T
    objects = [scene.objects for scene in drawn]
    same = torch.tensor([[a == b for b in objects] for a in objects])
    best = scores.argmax(dim=1)
    figures = {
        "swap_accuracy": wins.float().mean().item(),
        "retrieval_top1": same[torch.arange(count), best].float().mean().item(),
        "matched": scores.diagonal().mean().item(),
        "mismatched": scores[~same].mean().item(),
    }
    for attribute in ("colour", "shape", "size", "position"):
        chosen = torch.tensor([name == attribute for _, name in swaps])
        figures[f"swap_accuracy_{attribute}"] = wins[chosen].float().mean().item()
    return figures


# --------------------------------------------------------------------------------------------- world-aesthetic


@dataclass(frozen=True)
class WorldAestheticConfig:
    image_size: int = 32
    width: int = 16  # channels of the first conv; each later conv doubles them
    depth: int = 3  # stride-2 convs: 32² -> 4² at depth 3


@register_reward("world-aesthetic")
class WorldAesthetic(RewardModel):
    """A small CNN predicting the colourfulness (Hasler–Süsstrunk, divided by ``COLOURFULNESS_SCALE``) of an image.

    It ignores the prompt. Trained only on clean renders with saturation and brightness jitter, it has never seen
    noise or texture, and its input gradient is mostly high-frequency: gradient ascent on pixels finds patterns
    that raise its score about three times more than the true colourfulness (:func:`evaluate_world_aesthetic`
    measures it). That is intended: it stands in for the reward models whose direct optimisation produced
    high-frequency noise in RG-LCD. (Batch norm makes it both fit better and more exploitable than without.)

    ``WorldAesthetic(weights)`` loads a trained folder; ``WorldAesthetic(config=...)`` builds an untrained one.
    """

    def __init__(self, weights: str | Path | None = None, *, config: WorldAestheticConfig | None = None):
        super().__init__()
        folder, config = _weights_and_config(weights, config, "aesthetic", WorldAestheticConfig)
        self.config = config
        layers: list[nn.Module] = []
        channels = 3
        for level in range(config.depth):
            width = config.width * 2**level
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        # Colourfulness needs a spread (a mean of squares minus a squared mean): a hidden layer after the
        # average pool can form it, a linear read-out could not.
        self.net = nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        if folder is not None:
            load_model_weights(self, folder, MAKE_THEM)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0, 1] -> [B,3,S,S] at the model's image size, still in [0, 1]."""
        return resize(images.float(), self.config.image_size)

    def forward(self, images: Tensor, prompts: Sequence[str] = ()) -> Tensor:
        return self.net(2 * self.preprocess(images) - 1).squeeze(1)  # inputs centred on 0

    def save(self, out: str | Path, training: dict | None = None) -> Path:
        return _save(self, out, "world-aesthetic", self.config, training)


def vividness_jitter(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 renders -> [0, 1] images with saturation ×0-1.6 and brightness ×0.6-1.2, so colourfulness varies."""
    images = pixels.float() / 255
    count = len(images)
    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    images = grey + _uniform(count, 0.0, 1.6, generator) * (images - grey)
    return (images * _uniform(count, 0.6, 1.2, generator)).clamp(0, 1)


def colourfulness_target(images: Tensor) -> Tensor:
    """What world-aesthetic learns: Hasler–Süsstrunk colourfulness / ``COLOURFULNESS_SCALE``."""
    return Colorfulness()(images, []) / COLOURFULNESS_SCALE


def train_world_aesthetic(
    out: str | Path,
    *,
    samples: int = 8_000,
    steps: int = 1_500,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = REWARD_SEED + 7,
    config: WorldAestheticConfig | None = None,
    progress: bool = True,
) -> WorldAesthetic:
    """Regress colourfulness of jittered renders (MSE), save to ``out``, return the frozen model."""
    started = time.perf_counter()
    pixels = render_batch(scenes(seed, samples))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WorldAesthetic(config=config or WorldAestheticConfig())
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> Tensor:
        images = vividness_jitter(pixels[torch.randint(samples, (batch_size,), generator=generator)], generator)
        return F.mse_loss(model(images), colourfulness_target(images))

    optimiser = adamw_without_decay_on_gains(model, learning_rate, weight_decay=0.01)
    model.train()
    losses = fit(
        batch_loss, steps, optimiser, warmup_cosine(optimiser, steps), desc="world-aesthetic", progress=progress
    )
    recipe = {"samples": samples, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate}
    return _save_trained(model, out, {**recipe, "seed": seed}, started, losses)


def evaluate_world_aesthetic(
    model: WorldAesthetic,
    *,
    count: int = 512,
    seed: int = REWARD_SEED + 8,
    ascent_images: int = 16,
    ascent_steps: int = 40,
    ascent_step_size: float = 1 / 255,
    ascent_budget: float = 8 / 255,
) -> dict[str, float]:
    """Held-out fit and exploitability.

    ``correlation``: Pearson r between score and true (scaled) colourfulness on ``count`` fresh jittered renders.
    Then ``ascent_steps`` signed-gradient steps raise the score of ``ascent_images`` clean renders, each pixel
    staying within ``ascent_budget`` of the render (1 for no budget). ``score_*`` and ``true_*`` are the mean
    score and true colourfulness before and after (the same units); ``high_frequency`` is the share of the
    pixel change's energy above half the Nyquist frequency, per image (0.72 for white noise; about 0.02 when the true
    colourfulness itself is ascended).
    """
    generator = torch.Generator().manual_seed(seed)
    pixels = render_batch(scenes(seed, count))
    with torch.no_grad():
        images = vividness_jitter(pixels, generator)
        correlation = torch.corrcoef(torch.stack([model(images), colourfulness_target(images)]))[0, 1].item()

    start = pixels[:ascent_images].float() / 255
    images = start.clone()
    for _ in range(ascent_steps):
        images.requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(images).sum(), images)
        step = (images.detach() + ascent_step_size * gradient.sign() - start).clamp(-ascent_budget, ascent_budget)
        images = (start + step).clamp(0, 1)
    with torch.no_grad():
        return {
            "correlation": correlation,
            "score_before": model(start).mean().item(),
            "score_after": model(images).mean().item(),
            "true_before": colourfulness_target(start).mean().item(),
            "true_after": colourfulness_target(images).mean().item(),
            "high_frequency": high_frequency_share(images - start).mean().item(),
        }
