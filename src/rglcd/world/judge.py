"""The world's judge: a small CNN that checks an image against its prompt, standing in for human evaluation.

It reads which (colour, shape) pairs are present, how many objects there are and, for one object, its size
and position. It is trained only on renders from its own seed stream (``JUDGE_SEED``), so it is independent of
the teacher and the rewards. Its pooled features also give a Fréchet distance (an FID for the world).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..fitting import fit
from .paths import JUDGE_SEED
from .render import COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, render_batch, scenes

COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS)
HEADS = {"pairs": len(COLOUR_NAMES) * len(SHAPES), "count": 2, "size": len(SIZE_NAMES), "position": len(POSITIONS)}
WEIGHTS_FILE = "judge.safetensors"
CONFIG_FILE = "judge.json"
ATTRIBUTES = ("colour", "shape", "size", "position", "left", "right")  # per-attribute accuracy (attribute_checks)
IGNORE = -100  # size/position target of a two-object scene: those heads only learn from one-object scenes


def pair_index(shape: Shape) -> int:
    """The ``pairs`` logit of a (colour, shape) pair: colour index × len(SHAPES) + shape index."""
    return COLOUR_NAMES.index(shape.colour) * len(SHAPES) + SHAPES.index(shape.shape)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Judge(nn.Module):
    """A CNN on [B, 3, 32, 32] images in [0, 1], with one linear head per attribute (see ``HEADS``).

    The input gets two coordinate channels, so position survives global average pooling, and is then
    space-to-depth folded to 16×16 (lossless, and it keeps a training run within minutes on a CPU).
    """

    def __init__(self, feature_dim: int = 64, widths: Sequence[int] = (32, 48)) -> None:
        super().__init__()
        self.config = {"feature_dim": feature_dim, "widths": list(widths)}
        blocks: list[nn.Module] = []
        in_channels = (3 + 2) * 4  # RGB + (x, y), folded 2×2
        for i, out_channels in enumerate([*widths, feature_dim]):
            blocks += [nn.MaxPool2d(2)] if i else []  # 16×16 -> 8×8 -> 4×4
            blocks.append(_conv_block(in_channels, out_channels))
            in_channels = out_channels
        self.body = nn.Sequential(*blocks)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, size) for name, size in HEADS.items()})

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, images: Tensor) -> Tensor:
        """Pooled features [B, feature_dim]: the space of the world's FID analog (``rglcd eval --metrics fid``)."""
        batch, _, height, width = images.shape
        ys = torch.linspace(-1, 1, height, device=images.device).view(1, 1, height, 1).expand(batch, 1, height, width)
        xs = torch.linspace(-1, 1, width, device=images.device).view(1, 1, 1, width).expand(batch, 1, height, width)
        x = torch.cat([images.float() * 2 - 1, xs, ys], dim=1)
        x = self.body(F.pixel_unshuffle(x, 2))
        return x.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per head: ``pairs`` [B, 24] (multi-label), ``count`` [B, 2], ``size`` [B, 2], ``position`` [B, 5]."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def attribute_checks(self, images: Tensor, scenes: Sequence[Scene]) -> dict[str, Tensor]:
        """Per image [B], whether each of :data:`ATTRIBUTES` of its scene is found: 1.0 or 0.0, and NaN where the
        prompt has no such attribute; ``exact``: every check of :meth:`attribute_scores` passed. Use in eval mode.

        One object: ``colour`` and ``shape`` of the top pair logit, ``size``, ``position``; two objects: ``left`` and
        ``right``, that side's (colour, shape) pair found present (the judge does not locate the two).
        """
        if len(scenes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(scenes)} scenes")
        logits = self(images)
        present = (logits["pairs"] > 0).tolist()  # sigmoid > 0.5
        top_pair = logits["pairs"].argmax(dim=1).tolist()
        count, size, position = (logits[name].argmax(dim=1).tolist() for name in ("count", "size", "position"))
        nan = float("nan")
        checks: dict[str, list[float]] = {name: [] for name in (*ATTRIBUTES, "exact", "score")}
        for i, scene in enumerate(scenes):
            found = dict.fromkeys(ATTRIBUTES, nan)
            if len(scene.objects) == 1:
                shape = scene.objects[0]
                colour_found = COLOUR_NAMES[top_pair[i] // len(SHAPES)] == shape.colour
                shape_found = SHAPES[top_pair[i] % len(SHAPES)] == shape.shape
                found.update(colour=colour_found, shape=shape_found, size=size[i] == SIZE_NAMES.index(shape.size))
                found["position"] = position[i] == POSITION_NAMES.index(shape.position)
                # the score's 4 checks: the pair (top and present), one object, the size, the position
                passed = [colour_found and shape_found and present[i][pair_index(shape)], count[i] == 0]
                passed += [found["size"], found["position"]]
            elif len(scene.objects) == 2:
                for shape in scene.objects:
                    found[shape.position] = present[i][pair_index(shape)]
                passed = [found["left"], found["right"], count[i] == 1]  # the score's 3 checks
            else:
                raise ValueError(f"the judge checks scenes of 1 or 2 objects, not {len(scene.objects)}")
            for name in ATTRIBUTES:
                checks[name].append(float(found[name]))
            checks["exact"].append(float(all(passed)))
            checks["score"].append(sum(passed) / len(passed))
        return {name: torch.tensor(values, device=images.device) for name, values in checks.items()}

    def attribute_scores(self, images: Tensor, scenes: Sequence[Scene]) -> Tensor:
        """Per image, the fraction of its scene's attributes the judge finds (float in [0, 1]); use in eval mode.

        One object: its pair is the top pair logit and present, the count is one, the size and the position
        are right (4 checks). Two objects: each pair is present and the count is two (3 checks).
        """
        return self.attribute_checks(images, scenes)["score"]

    def save(self, folder: str | Path, training: dict | None = None) -> Path:
        """Write ``judge.safetensors`` and ``judge.json`` (the architecture, plus ``training`` facts if given)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: value.contiguous() for name, value in self.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({**self.config, "training": training or {}}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Judge:
        """A judge saved by :meth:`save`, in eval mode."""
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a saved judge: {name} is missing (make one with train_judge)")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            judge = cls(feature_dim=int(config["feature_dim"]), widths=[int(w) for w in config["widths"]])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{folder / CONFIG_FILE} is not a valid judge config: {error!r}") from error
        try:
            judge.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except RuntimeError as error:
            raise ValueError(f"{folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: {error}") from error
        return judge.eval()


def judge_targets(scene_list: Sequence[Scene]) -> dict[str, Tensor]:
    """Training targets per head; size and position are ``IGNORE`` for two-object scenes."""
    pairs = torch.zeros(len(scene_list), HEADS["pairs"])
    count, size, position = [], [], []
    for i, scene in enumerate(scene_list):
        for shape in scene.objects:
            pairs[i, pair_index(shape)] = 1.0
        single = len(scene.objects) == 1
        count.append(0 if single else 1)
        size.append(SIZE_NAMES.index(scene.objects[0].size) if single else IGNORE)
        position.append(POSITION_NAMES.index(scene.objects[0].position) if single else IGNORE)
    return {
        "pairs": pairs,
        "count": torch.tensor(count),
        "size": torch.tensor(size),
        "position": torch.tensor(position),
    }


def judge_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Summed head losses: BCE summed over the 24 pairs, cross-entropy for count, size and position."""
    loss = F.binary_cross_entropy_with_logits(logits["pairs"], targets["pairs"], reduction="none").sum(1).mean()
    loss = loss + F.cross_entropy(logits["count"], targets["count"])
    for name in ("size", "position"):
        if (targets[name] != IGNORE).any():  # an all-ignored batch would give NaN
            loss = loss + F.cross_entropy(logits[name], targets[name], ignore_index=IGNORE)
    return loss


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 renders -> [0, 1] floats with attribute-preserving damage: blur, contrast, brightness, pixel noise.

    Generated images are soft, tinted and noisy; the judge must read attributes through that.
    """
    x = images.float() / 255

    def per_image(low: float, high: float) -> Tensor:
        return torch.empty(x.shape[0], 1, 1, 1).uniform_(low, high, generator=generator)

    x = torch.lerp(x, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), per_image(0.0, 0.6))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * per_image(0.8, 1.2) + mean + per_image(-0.08, 0.08)
    x = x + torch.randn(x.shape, generator=generator) * per_image(0.0, 0.15)
    return x.clamp(0, 1)


def held_out_accuracy(judge: Judge, *, seed: int = JUDGE_SEED + 1, count: int = 512, noise: float = 0.0) -> float:
    """Mean :meth:`Judge.attribute_scores` on ``count`` fresh renders, with optional Gaussian pixel noise."""
    scene_list = scenes(seed, count)
    images = render_batch(scene_list).float() / 255
    if noise > 0:
        images = (images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return judge.attribute_scores(images, scene_list).mean().item()


def train_judge(
    out: str | Path,
    *,
    samples: int = 20_000,
    steps: int = 3_000,
    batch_size: int = 128,
    seed: int = JUDGE_SEED,
    learning_rate: float = 3e-3,
    progress: bool = True,
) -> Judge:
    """Train a judge on ``scenes(seed, samples)``, save it to ``out`` and return it in eval mode.

    Deterministic in ``seed`` (for a given torch build and thread count). The saved ``judge.json`` records
    the run and the held-out accuracy on ``scenes(seed + 1, 512)``.
    """
    if samples < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"samples, steps and batch_size must be positive, got {samples}, {steps}, {batch_size}")
    started = time.perf_counter()
    scene_list = scenes(seed, samples)
    images, targets = render_batch(scene_list), judge_targets(scene_list)  # rendered once, indexed every step
    torch.manual_seed(seed)  # weight initialisation
    generator = torch.Generator().manual_seed(seed)  # batches and augmentation
    judge = Judge().train()

    def batch_loss() -> Tensor:
        index = torch.randint(samples, (batch_size,), generator=generator)
        return judge_loss(judge(augment(images[index], generator)), {k: v[index] for k, v in targets.items()})

    optimizer = torch.optim.AdamW(judge.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    losses = fit(batch_loss, steps, optimizer, schedule, desc="judge", progress=progress)
    judge.eval()
    accuracy = held_out_accuracy(judge, seed=seed + 1)
    training = {
        "seed": seed,
        "samples": samples,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "final_loss": losses[-1],
        "held_out_seed": seed + 1,
        "held_out_accuracy": accuracy,
        "seconds": round(time.perf_counter() - started, 1),
    }
    judge.save(out, training)
    if progress:
        tqdm.write(f"judge: held-out attribute accuracy {accuracy:.4f}, saved to {out}")
    return judge
