"""Image folders for comparing teachers (DDIM + CFG) with consistency models at several step counts: generated,
then scored.

Every model sees the same noise for a prompt (prompt i is seeded with seed + i, whatever the batch), images are
written as PNGs under a manifest of what they are, and an image already on disk is not generated again, so an
interrupted evaluation resumes where it stopped. Scorers then stream over the written images batch by batch, so
memory does not grow with the prompt set: per-image scorers (rewards, the judge, spectral energy) give a row's mean,
standard deviation and bootstrap interval and, for grouped prompt sets, the HPSv2 benchmark's per-group chunk
statistics (:mod:`rglcd.stats`); set scorers (FID, :mod:`rglcd.fid`) accumulate over the batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .errors import RglcdError
from .export import load_lcm
from .files import atomic_file
from .models import SpeedSwitches, TeacherLoadError, load_teacher, place, read_pipeline_index
from .models.speed import pick_device, sampling_dtype, synchronize
from .sampling import TCD_ETA, consistency_scheduler, ddim_cfg_sample, ddim_scheduler, lcm_sample, to_pil
from .stats import bootstrap_mean, group_statistics, paired_differences

PerImageScorer = Callable[[Tensor, list[str], list[Any]], Tensor]  # images, captions, records -> [N]


class SetScorer(Protocol):
    """A measure of a whole image set, accumulated batch by batch (e.g. FID)."""

    def reset(self) -> None: ...
    def update(self, images: Tensor, captions: list[str], records: list[Any]) -> None: ...
    def compute(self) -> float: ...


class EvalError(RglcdError, ValueError):
    """The evaluation cannot run as asked (unknown metric, missing files, not a pipeline); raised before generating."""


@dataclass(frozen=True)
class Contender:
    """A model under evaluation: a diffusers pipeline folder sampled at each of ``steps``."""

    label: str
    path: Path
    kind: Literal["teacher", "lcm"]
    steps: tuple[int, ...]
    guidance_scale: float  # CFG scale for a teacher; diffusers' LCM guidance (w + 1) for a consistency model
    sampler: Literal["lcm", "tcd"] = "lcm"  # a consistency model's scheduler (rglcd.sampling.consistency_scheduler)
    eta: float = TCD_ETA  # TCD's γ (with sampler "tcd")


def pipeline_kind(path: str | Path) -> Literal["teacher", "lcm"]:
    """``lcm`` for a pipeline whose scheduler is an LCMScheduler (an exported student), else ``teacher``."""
    try:
        index = read_pipeline_index(str(path), revision=None)
    except TeacherLoadError as error:
        raise EvalError(str(error)) from error
    if "unet" not in index or not isinstance(index.get("scheduler"), list):  # components are [library, class]
        raise EvalError(f"{path} is not a UNet diffusion pipeline (model_index.json has {sorted(index)})")
    return "lcm" if index["scheduler"][-1] == "LCMScheduler" else "teacher"


NO_SWITCHES = SpeedSwitches()


def load_contender(
    contender: Contender,
    speed: SpeedSwitches = NO_SWITCHES,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
):
    """The pipeline parts a contender is sampled with, frozen, on ``device`` (``auto``: the first GPU, else the CPU) in
    ``dtype`` (None: bfloat16 on a GPU, else float32; an SDXL ``force_upcast`` VAE in float32: :func:`models.place`),
    with the speed switches on its UNet and VAE."""
    device = pick_device(device)
    parts = load_teacher(contender.path) if contender.kind == "teacher" else load_lcm(contender.path)
    if contender.kind == "lcm":
        parts.scheduler = consistency_scheduler(parts.scheduler.config, contender.sampler)
    place(parts, device, dtype or sampling_dtype(None, device))
    speed.apply(parts.unet, parts.vae)
    return parts


def _sample(
    contender: Contender, parts, captions: list[str], steps: int, generators: list, resolution: int | None
) -> Tensor:
    common = dict(num_steps=steps, guidance_scale=contender.guidance_scale, generator=generators, resolution=resolution)
    if contender.kind == "teacher":
        return ddim_cfg_sample(parts.unet, parts.vae, parts, ddim_scheduler(parts.scheduler_config), captions, **common)
    return lcm_sample(parts.unet, parts.vae, parts, parts.scheduler, captions, **common, eta=contender.eta)


def image_path(folder: Path, index: int) -> Path:
    """Where prompt ``index``'s image goes: ``folder/00042.png``."""
    return folder / f"{index:05d}.png"


def image_paths(folder: Path, count: int) -> list[Path]:
    return [image_path(folder, index) for index in range(count)]


def generate(
    contender: Contender,
    parts,
    captions: list[str],
    steps: int,
    folder: Path,
    seed: int = 0,
    batch_size: int = 32,
    resolution: int | None = None,
) -> float | None:
    """Write the missing images of ``captions`` to ``folder``; ms/image of those (None if none was missing), timed
    after one warm-up batch (torch.compile's compilation, cuDNN's autotuning, the allocator's first requests) and
    with the device's queue drained before each clock read."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [index for index, path in enumerate(image_paths(folder, len(captions))) if not path.exists()]
    device = parts.unet.device

    def sample(indices: list[int]) -> Tensor:
        generators = [torch.Generator().manual_seed(seed + index) for index in indices]
        return _sample(contender, parts, [captions[index] for index in indices], steps, generators, resolution)

    if missing:
        sample(missing[:batch_size])  # the warm-up, not timed, its images dropped
    elapsed = 0.0
    batches = range(0, len(missing), batch_size)
    for start in tqdm(batches, desc=f"{contender.label} · {steps} steps", leave=False, disable=not missing):
        indices = missing[start : start + batch_size]
        synchronize(device)
        began = time.perf_counter()
        images = sample(indices)
        synchronize(device)
        elapsed += time.perf_counter() - began
        for index, image in zip(indices, to_pil(images), strict=True):
            with atomic_file(image_path(folder, index)) as partial:  # a kill mid-write never leaves a truncated image
                image.save(partial)
    return 1000 * elapsed / len(missing) if missing else None


def read_images(paths: Sequence[Path], batch_size: int) -> Iterator[tuple[int, Tensor]]:
    """(start index, images [b,3,H,W] in [0,1]) batch by batch, from PNG/JPEG files."""
    for start in range(0, len(paths), batch_size):
        arrays = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths[start : start + batch_size]])
        yield start, torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # [b, 3, H, W]


@dataclass
class Scorers:
    """What scores every (model, steps): per-image scorers (with the factor that puts each on its benchmark's
    scale in tables) and set scorers, by the column they fill."""

    per_image: dict[str, PerImageScorer]
    per_set: dict[str, SetScorer]
    benchmark_scales: dict[str, float]


def evaluate(
    contenders: Sequence[Contender],
    captions: list[str],
    out: Path,
    scorers: Scorers,
    records: list[Any] | None = None,
    groups: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    resolution: int | None = None,
    speed: SpeedSwitches = NO_SWITCHES,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
) -> list[dict]:
    """One row per (model, steps): every per-image scorer's mean and std on its benchmark scale (and per-group
    statistics when the prompts have groups), every set scorer's value, ms/image and images/s. Per-image values
    (unscaled) go to ``scores.json`` beside the images. Models sample on ``device`` (``auto``: the first GPU, else
    the CPU) in ``dtype`` (None: bfloat16 on a GPU, else float32), and the scorers read the images there."""
    records = records if records is not None else list(captions)
    device = pick_device(device)
    dtype = dtype or sampling_dtype(None, device)
    folders = {
        (contender.label, steps): _claim_folder(
            out / "images" / f"{contender.label}-{steps}", contender, steps, captions, seed, resolution, dtype
        )
        for contender in contenders
        for steps in contender.steps
    }  # all checked before anything is generated
    rows = []
    for contender in contenders:
        parts = load_contender(contender, speed, device, dtype)
        for steps in contender.steps:
            folder = folders[contender.label, steps]
            ms = generate(contender, parts, captions, steps, folder, seed, batch_size, resolution)
            timing_file = folder / "timing.json"  # the generation's speed, kept for reruns that generate nothing
            if ms is not None:
                timing_file.write_text(json.dumps({"ms_per_image": ms}))
            elif timing_file.exists():
                ms = json.loads(timing_file.read_text())["ms_per_image"]
            values = _measure(image_paths(folder, len(captions)), captions, records, scorers, batch_size, device)
            (folder / "scores.json").write_text(strict_json(values))
            row: dict[str, Any] = {
                "model": contender.label, "kind": contender.kind, "steps": steps,
                "guidance_scale": contender.guidance_scale, "images": str(folder),
            }  # fmt: skip
            if contender.kind == "lcm":
                row.update(sampler=contender.sampler, eta=contender.eta if contender.sampler == "tcd" else None)
            for name in scorers.per_image:
                scaled = scorers.benchmark_scales.get(name, 1.0) * np.asarray(values[name], dtype=float)
                scaled = scaled[~np.isnan(scaled)]  # NaN: the metric does not apply to that prompt
                row[name] = float(scaled.mean()) if len(scaled) else None
                row[f"{name}_std"] = float(scaled.std(ddof=1)) if len(scaled) > 1 else None
                interval = bootstrap_mean(scaled) if len(scaled) > 1 else None  # the mean's, over the prompts
                row[f"{name}_ci"] = [interval.low, interval.high] if interval else None
            for name in scorers.per_set:
                row[name] = values[name]
            if groups and any(groups):
                row["groups"] = {
                    name: group_statistics(values[name], groups, scorers.benchmark_scales.get(name, 1.0))
                    for name in scorers.per_image
                }
            row["ms_per_image"] = ms
            row["images_per_second"] = 1000 / ms if ms else None
            rows.append(row)
    return rows


def _claim_folder(
    folder: Path,
    contender: Contender,
    steps: int,
    captions: list[str],
    seed: int,
    resolution: int | None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The image folder of (model, steps), with a ``manifest.json`` of what its images are; images made for other
    prompts or settings are never reused (an EvalError says so), and images of other weights at the model's path
    (a retrained model) are deleted, to be made again."""
    manifest = {
        "model": str(contender.path), "kind": contender.kind, "steps": steps,
        "guidance_scale": contender.guidance_scale, "seed": seed, "resolution": resolution,
        **({"sampler": contender.sampler, "eta": contender.eta} if contender.sampler != "lcm" else {}),
        # Only a reduced precision is written, so folders made before --dtype (all float32) stay valid.
        **({"dtype": str(dtype).removeprefix("torch.")} if dtype != torch.float32 else {}),
        "prompts_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
        "weights": weights_fingerprint(contender.path),
    }  # fmt: skip
    path = folder / "manifest.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("weights") != manifest["weights"]:
            for image in folder.glob("*.png"):
                image.unlink()
            path.write_text(json.dumps(manifest, indent=2))
            print(f"rglcd eval: {contender.path} changed since {folder} was made; its images are made again")
            existing = manifest
        # Both ways: a setting written only when it differs from its default (dtype, sampler) may be missing in either.
        changed = sorted(key for key in manifest.keys() | existing.keys() if existing.get(key) != manifest.get(key))
        if changed:
            raise EvalError(
                f"{folder} holds images made with another {', '.join(changed)}; choose another --out or delete it"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))
    return folder


def weights_fingerprint(model: str | Path) -> str:
    """What identifies a pipeline's weights: for a local folder, every weights file's name, size and modification
    time and every config's contents (the scheduler's too); for a hub id, the id."""
    folder = Path(model)
    if not folder.is_dir():
        return str(model)
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.suffix in (".safetensors", ".bin", ".pt", ".ckpt"):
            stat = file.stat()
            digest.update(f"{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        elif file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _measure(
    paths: list[Path],
    captions: list[str],
    records: list[Any],
    scorers: Scorers,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-image scorer values (lists) and set scorer values over the images at ``paths``, read onto ``device``."""
    values: dict[str, Any] = {name: [] for name in scorers.per_image}
    for scorer in scorers.per_set.values():
        scorer.reset()
    with torch.no_grad():
        for start, images in read_images(paths, batch_size):
            images = images.to(device)  # [b, 3, H, W] float32: the scorers keep full precision whatever --dtype
            texts, batch_records = captions[start : start + len(images)], records[start : start + len(images)]
            for name, scorer in scorers.per_image.items():
                values[name] += scorer(images, texts, batch_records).float().cpu().tolist()
            for scorer in scorers.per_set.values():
                scorer.update(images, texts, batch_records)
    for name, scorer in scorers.per_set.items():
        values[name] = scorer.compute()
    return values


def comparison_pairs(rows: list[dict], training_seeds: Mapping[str, int] | None = None) -> list[tuple[dict, dict]]:
    """The rows worth comparing prompt by prompt: two models at the same step count, and every consistency model's
    row against the teacher's row with the most steps (the paper's few-step vs many-step comparison). Models with
    different ``training_seeds`` (by label) are compared only with the teacher, as a seed study reads them."""
    seed_of = training_seeds or {}
    pairs = [
        (first, second)
        for index, first in enumerate(rows)
        for second in rows[index + 1 :]
        if first["steps"] == second["steps"] and first["model"] != second["model"]
    ]
    teachers = [row for row in rows if row.get("kind") == "teacher"]
    if teachers:
        reference = max(teachers, key=lambda row: row["steps"])
        pairs += [(row, reference) for row in rows if row.get("kind") == "lcm"]
    return [
        (first, second)
        for first, second in pairs
        if second.get("kind") == "teacher" or seed_of.get(first["model"]) == seed_of.get(second["model"])
    ]


def paired_row_differences(
    pairs: Sequence[tuple[dict, dict]], names: Sequence[str], scales: dict[str, float] | None = None
) -> list[dict]:
    """Per pair of rows (same prompts, same seeds), each per-image metric's paired difference on its benchmark scale
    (:func:`rglcd.stats.paired_differences`), from the rows' ``scores.json``."""
    scores: dict[str, dict] = {}  # by images folder: a row may be in several pairs
    records = []
    for first, second in pairs:
        for row in (first, second):
            if row["images"] not in scores:
                scores[row["images"]] = json.loads(Path(row["images"], "scores.json").read_text())
        record = {"first": first["model"], "first_steps": first["steps"]}
        record.update(second=second["model"], second_steps=second["steps"])
        record.update(paired_differences(scores[first["images"]], scores[second["images"]], names, scales))
        records.append(record)
    return records


def strict_json(data: Any, indent: int | None = None) -> str:
    """JSON that strict parsers read: NaN and ±Infinity (not JSON) become null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=indent, allow_nan=False)


def relative_to_teacher(rows: list[dict], metric: str, name: str) -> None:
    """``row[name] = row[metric] / teacher's`` for every row, against the teacher row with the most steps (the
    high-frequency energy ratio, an over-optimisation monitor); nothing when there is no teacher row."""
    teachers = [row for row in rows if row.get("kind") == "teacher"]
    if not teachers:
        return
    reference = max(teachers, key=lambda row: row["steps"])[metric]
    for row in rows:
        row[name] = row[metric] / reference if reference else None
