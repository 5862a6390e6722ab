"""Generation and metrics for comparing teachers (DDIM + CFG) with consistency models at several step counts.

Every model sees the same noise for a prompt (prompt i is seeded with seed + i, whatever the batch), images are
written as PNGs, and an image already on disk is not generated again, so an interrupted evaluation resumes where
it stopped. Metrics then stream over the written images batch by batch, so memory does not grow with the prompt
set: per-image metrics (rewards, the judge, spectral energy) give a mean, a standard deviation and, for grouped
prompt sets, the HPSv2 benchmark's per-group chunk statistics; set metrics (FID) accumulate over the batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from .errors import RglcdError
from .export import load_lcm
from .files import atomic_file
from .models import SpeedSwitches, TeacherLoadError, load_teacher, place, read_pipeline_index
from .models.speed import pick_device, sampling_dtype, synchronize
from .sampling import TCD_ETA, consistency_scheduler, ddim_cfg_sample, lcm_sample, to_pil

PerImageMetric = Callable[[Tensor, list[str], list[Any]], Tensor]  # images, captions, records -> [N]
HPSV2_CHUNK = 80  # HPSv2's benchmark: 800 prompts per style in 10 chunks of 80


class SetMetric(Protocol):
    """A metric of a whole image set, accumulated batch by batch (e.g. FID)."""

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
    common = dict(
        prompts=captions, num_steps=steps, guidance_scale=contender.guidance_scale, generator=generators,
        resolution=resolution,
    )  # fmt: skip
    if contender.kind == "teacher":
        return ddim_cfg_sample(parts.unet, parts.vae, parts, parts.scheduler_config, **common)
    return lcm_sample(parts.unet, parts.vae, parts, parts.scheduler, eta=contender.eta, **common)


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


def chunk_statistics(scores: Sequence[float], chunk: int = HPSV2_CHUNK) -> tuple[float, float]:
    """HPSv2's benchmark arithmetic for one style: the means of consecutive chunks of ``chunk`` scores (in prompt
    order; a shorter last chunk counts as one), then the mean and the population std (ddof 0) of those means."""
    if not scores:
        raise ValueError("no scores")
    means = [float(np.mean(scores[start : start + chunk])) for start in range(0, len(scores), chunk)]
    return float(np.mean(means)), float(np.std(means))


@dataclass(frozen=True)
class Estimate:
    """A mean over items (prompts) with its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    count: int

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_mean(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of ``values`` and the percentile bootstrap interval at ``level`` of that mean: ``resamples``
    resamplings of the items with replacement, from ``seed`` (the same inputs give the same interval)."""
    values = np.asarray(values, dtype=float)  # [N]
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {values.size}")
    picks = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    low, high = np.quantile(values[picks].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(values.mean()), float(low), float(high), len(values))


def paired_difference(
    first: Sequence[float], second: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """``first − second`` item by item (same prompt, same seed) and :func:`bootstrap_mean` of the differences."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(f"paired_difference needs two paired sequences of >= 2 items, not {len(first)}, {len(second)}")
    return bootstrap_mean(np.asarray(first, dtype=float) - np.asarray(second, dtype=float), level, resamples, seed)


def comparison_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """The rows worth comparing prompt by prompt: two models at the same step count, and every consistency model's
    row against the teacher's row with the most steps (the paper's few-step vs many-step comparison)."""
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
    return pairs


def paired_differences(
    pairs: Sequence[tuple[dict, dict]], names: Sequence[str], scales: dict[str, float] | None = None
) -> list[dict]:
    """Per pair of rows (same prompts, same seeds), each per-image metric's :func:`paired_difference` on its benchmark
    scale, read from the rows' ``scores.json``."""
    scales, scores = scales or {}, {}
    records = []
    for first, second in pairs:
        record = {"first": first["model"], "first_steps": first["steps"]}
        record.update(second=second["model"], second_steps=second["steps"])
        for row in (first, second):
            if row["images"] not in scores:
                scores[row["images"]] = json.loads(Path(row["images"], "scores.json").read_text())
        for name in names:
            scale = scales.get(name, 1.0)
            a, b = (scale * np.asarray(scores[row["images"]][name], dtype=float) for row in (first, second))
            both = ~(np.isnan(a) | np.isnan(b))  # the prompts the metric applies to (null in scores.json: NaN)
            record[name] = asdict(paired_difference(a[both], b[both])) if both.sum() > 1 else None
        records.append(record)
    return records


def group_statistics(
    values: Sequence[float], groups: Sequence[str], scale: float = 1.0, chunk: int = HPSV2_CHUNK
) -> dict[str, dict[str, float | None]]:
    """Per group (in order of appearance): the chunk mean and std of ``scale · value`` and the number of chunks (a
    group of one chunk has no spread to report: its std is None); ``average``: the mean over every image, which HPSv2
    reports as its overall score."""
    scaled = [scale * value for value in values]
    table = {}
    for group in dict.fromkeys(groups):
        members = [v for v, g in zip(scaled, groups, strict=True) if g == group and not math.isnan(v)]
        if not members:  # the metric applies to none of the group's prompts
            table[group] = {"mean": None, "std": None, "chunks": 0}
            continue
        mean, std = chunk_statistics(members, chunk)
        chunks = math.ceil(len(members) / chunk)
        table[group] = {"mean": mean, "std": std if chunks > 1 else None, "chunks": chunks}
    applicable = [value for value in scaled if not math.isnan(value)]
    table["average"] = {"mean": float(np.mean(applicable)) if applicable else None, "std": None, "chunks": None}
    return table


class FeatureExtractor(nn.Module):
    """Any function of [0, 1] images to features [N, d] as the module torchmetrics' FID takes."""

    def __init__(self, extract: Callable[[Tensor], Tensor], num_features: int):
        super().__init__()
        self.extract, self.num_features = extract, num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images)


def fit_square(images: Tensor, size: int) -> Tensor:
    """Centre-crop to a square and resize to ``size``² (antialiased bicubic): FID's common preparation of
    reference and generated images alike (as GigaGAN's and DMD2's COCO evaluations, there at 256)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", antialias=True)
    return images.clamp(0, 1)


class FrechetDistance:
    """FID through torchmetrics against fixed reference images, with Inception (``features`` = 2048; weights from
    a local file, which needs torch-fidelity) or any :class:`FeatureExtractor`, on ``device`` (a FeatureExtractor's
    model must be there too). With ``size``, references and generated images are both fitted to ``size``² first
    (:func:`fit_square`)."""

    def __init__(
        self,
        features: int | nn.Module,
        references: Iterator[Tensor],
        inception_weights: str | Path | None = None,
        size: int | None = None,
        device: str | torch.device = "cpu",
    ):
        options = {} if isinstance(features, nn.Module) else {"feature_extractor_weights_path": inception_weights}
        # normalize: inputs are floats in [0, 1]; the real statistics survive reset() between models.
        self.fid = FrechetInceptionDistance(features, normalize=True, reset_real_features=False, **options).to(device)
        self.size = size
        count = 0
        for batch in references:
            self.fid.update(self._fit(batch.to(self.fid.device)), real=True)
            count += len(batch)
        if count < 2:
            raise EvalError(f"FID needs at least 2 reference images, got {count}")

    def _fit(self, images: Tensor) -> Tensor:
        return images if self.size is None else fit_square(images, self.size)

    def reset(self) -> None:
        self.fid.reset()

    def update(self, images: Tensor, captions: list[str], records: list[Any]) -> None:
        self.fid.update(self._fit(images), real=False)

    def compute(self) -> float:
        return float(self.fid.compute())


@dataclass
class Metrics:
    """What to measure on every (model, steps): per-image metrics (with the factor that puts each on its
    benchmark's scale in group tables) and set metrics."""

    per_image: dict[str, PerImageMetric]
    per_set: dict[str, SetMetric]
    benchmark_scales: dict[str, float]


def evaluate(
    contenders: Sequence[Contender],
    captions: list[str],
    out: Path,
    metrics: Metrics,
    records: list[Any] | None = None,
    groups: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    resolution: int | None = None,
    speed: SpeedSwitches = NO_SWITCHES,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
) -> list[dict]:
    """One row per (model, steps): every per-image metric's mean and std on its benchmark scale (and per-group
    statistics when the prompts have groups), every set metric, ms/image and images/s. Per-image values (unscaled)
    go to ``scores.json`` beside the images. Models sample on ``device`` (``auto``: the first GPU, else the CPU) in
    ``dtype`` (None: bfloat16 on a GPU, else float32), and the metrics read the images there."""
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
            values = _measure(image_paths(folder, len(captions)), captions, records, metrics, batch_size, device)
            (folder / "scores.json").write_text(strict_json(values))
            row: dict[str, Any] = {
                "model": contender.label, "kind": contender.kind, "steps": steps,
                "guidance_scale": contender.guidance_scale, "images": str(folder),
            }  # fmt: skip
            if contender.kind == "lcm":
                row.update(sampler=contender.sampler, eta=contender.eta if contender.sampler == "tcd" else None)
            for name in metrics.per_image:
                scaled = metrics.benchmark_scales.get(name, 1.0) * np.asarray(values[name], dtype=float)
                scaled = scaled[~np.isnan(scaled)]  # NaN: the metric does not apply to that prompt
                row[name] = float(scaled.mean()) if len(scaled) else None
                row[f"{name}_std"] = float(scaled.std(ddof=1)) if len(scaled) > 1 else None
                interval = bootstrap_mean(scaled) if len(scaled) > 1 else None  # the mean's, over the prompts
                row[f"{name}_ci"] = [interval.low, interval.high] if interval else None
            for name in metrics.per_set:
                row[name] = values[name]
            if groups and any(groups):
                row["groups"] = {
                    name: group_statistics(values[name], groups, metrics.benchmark_scales.get(name, 1.0))
                    for name in metrics.per_image
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
    metrics: Metrics,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-image metric values (lists) and set metric values over the images at ``paths``, read onto ``device``."""
    values: dict[str, Any] = {name: [] for name in metrics.per_image}
    for metric in metrics.per_set.values():
        metric.reset()
    with torch.no_grad():
        for start, images in read_images(paths, batch_size):
            images = images.to(device)  # [b, 3, H, W] float32: the metrics keep full precision whatever --dtype
            texts, batch_records = captions[start : start + len(images)], records[start : start + len(images)]
            for name, metric in metrics.per_image.items():
                values[name] += metric(images, texts, batch_records).float().cpu().tolist()
            for metric in metrics.per_set.values():
                metric.update(images, texts, batch_records)
    for name, metric in metrics.per_set.items():
        values[name] = metric.compute()
    return values


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
