"""Generation and metrics for comparing a teacher (DDIM + CFG) with consistency models at several step counts.

Every model sees the same noise for a prompt (prompt i is seeded with seed + i, whatever the batch), images are
written as PNGs, and a (model, steps) pair whose images are all on disk is not generated again, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sampling import ddim_cfg_sample, lcm_sample, to_pil

PerImageMetric = Callable[[Tensor, list[str], list[Any]], Tensor]  # images, captions, records -> [N]
SetMetric = Callable[[Tensor, list[str], list[Any]], float]  # images, captions, records -> one number


@dataclass(frozen=True)
class Contender:
    """A model under evaluation: a diffusers pipeline folder sampled at each of ``steps``."""

    label: str
    path: Path
    kind: Literal["teacher", "lcm"]
    steps: tuple[int, ...]
    guidance_scale: float  # CFG scale for a teacher; diffusers' LCM guidance (w + 1) for a consistency model


def load_contender(contender: Contender):
    """The pipeline parts a contender is sampled with (frozen, CPU or the first GPU)."""
    from .models import load_teacher
    from .sampling import load_lcm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if contender.kind == "teacher":
        return load_teacher(contender.path).to(device)
    return load_lcm(contender.path, device)


def _sample(contender: Contender, parts, captions: list[str], steps: int, generators: list[torch.Generator]) -> Tensor:
    common = dict(prompts=captions, num_steps=steps, guidance_scale=contender.guidance_scale, generator=generators)
    if contender.kind == "teacher":
        return ddim_cfg_sample(
            parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config, **common
        )
    return lcm_sample(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler, **common)


def generate(
    contender: Contender, parts, captions: list[str], steps: int, folder: Path, seed: int = 0, batch_size: int = 32
) -> tuple[Tensor, float | None]:
    """Images [N,3,H,W] in [0,1] for all captions, and ms/image (None when every image was already on disk)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:05d}.png" for index in range(len(captions))]
    missing = [index for index, path in enumerate(paths) if not path.exists()]
    elapsed = 0.0
    batches = range(0, len(missing), batch_size)
    for start in tqdm(batches, desc=f"{contender.label} · {steps} steps", leave=False, disable=not missing):
        indices = missing[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + index) for index in indices]
        began = time.perf_counter()
        images = _sample(contender, parts, [captions[index] for index in indices], steps, generators)
        elapsed += time.perf_counter() - began
        for index, image in zip(indices, to_pil(images), strict=True):
            image.save(paths[index])
    loaded = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])  # [N, H, W, 3]
    images = torch.from_numpy(loaded).permute(0, 3, 1, 2).float() / 255
    return images, (1000 * elapsed / len(missing) if missing else None)


def evaluate(
    contenders: Sequence[Contender],
    captions: list[str],
    out: Path,
    per_image_metrics: dict[str, PerImageMetric],
    set_metrics: dict[str, SetMetric] | None = None,
    records: list[Any] | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict]:
    """One row per (model, steps): every metric's mean (and std for per-image metrics), and ms/image."""
    set_metrics = set_metrics or {}
    records = records if records is not None else list(captions)
    rows = []
    for contender in contenders:
        parts = load_contender(contender)
        for steps in contender.steps:
            folder = out / "images" / f"{contender.label}-{steps}"
            images, ms = generate(contender, parts, captions, steps, folder, seed, batch_size)
            row: dict[str, Any] = {"model": contender.label, "steps": steps, "images": str(folder)}
            for name, metric in per_image_metrics.items():
                with torch.no_grad():
                    values = metric(images, captions, records).float()
                row[name] = values.mean().item()
                row[f"{name}_std"] = values.std().item() if len(values) > 1 else 0.0
            for name, metric in set_metrics.items():
                with torch.no_grad():
                    row[name] = float(metric(images, captions, records))
            timing_file = folder / "timing.json"
            if ms is not None:
                timing_file.write_text(json.dumps({"ms_per_image": ms}))
            row["ms_per_image"] = json.loads(timing_file.read_text())["ms_per_image"] if timing_file.exists() else None
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    header = "| model | steps | " + " | ".join(columns) + " |"
    rule = "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"
    lines = [header, rule]
    for row in rows:
        cells = [_format(row.get(column)) for column in columns]
        lines.append(f"| {row['model']} | {row['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def comparison_grid(rows: list[dict], prompt_indices: list[int], path: Path) -> Path:
    """A PNG with one row per prompt and one column per (model, steps), read from the written images."""
    from PIL import Image

    tiles = [
        [Image.open(Path(row["images"]) / f"{index:05d}.png").convert("RGB") for row in rows]
        for index in prompt_indices
    ]
    width, height = tiles[0][0].size
    grid = Image.new("RGB", (width * len(rows), height * len(prompt_indices)), "white")
    for r, tile_row in enumerate(tiles):
        for c, tile in enumerate(tile_row):
            grid.paste(tile, (c * width, r * height))
    grid.save(path)
    return path
