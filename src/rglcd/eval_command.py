"""``rglcd eval``: the paper's evaluation protocol as one command.

Models (exported LCM/RG-LCM folders, sampled with their LCMScheduler at ``steps``; teachers, sampled with
DDIM + CFG at ``teacher_steps``) generate the images of a prompt set (the HPSv2 benchmark, PartiPrompts, COCO
captions, a text file, a plugin's such as the miniature's held-out prompts) with the same noise per prompt, and are
scored by any registered reward, the HPSv2 protocol per style, FID, the high-frequency energy ratio and any metric a
plugin registers (:data:`METRICS`; the world's judge). Everything is checked (models, prompt files, metric names,
weights) before the first image is generated. An experiment describes its run with an :class:`EvalRun`: the report's
title and notes, and which models are training seeds' replicates of one recipe.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler

from .config import pipeline_vae_scale_factor, resolution_problem
from .evaluate import (
    Contender,
    EvalError,
    Scorers,
    comparison_pairs,
    evaluate,
    paired_row_differences,
    pipeline_kind,
    read_images,
    relative_to_teacher,
)
from .export import add_evaluation_to_card
from .fid import FrechetDistance
from .metrics import high_frequency_share
from .models import SpeedSwitches
from .models.speed import pick_device, sampling_dtype
from .plugins import Registry
from .prompts import Prompt, load_prompts, prompt_set
from .report import markdown_table, seed_tables, write_report
from .rewards import REWARDS, build_reward
from .sampling import LCM_GUIDANCE, SAMPLERS, TCD_ETA, TEACHER_GUIDANCE
from .stats import HPSV2_CHUNK, contrast_effects, family_spreads

COCO_FID_SIZE = 256  # GigaGAN's and DMD2's COCO protocol: centre crop, 256²


@dataclass
class EvalSettings:
    models: list[str]  # "PATH" or "LABEL=PATH": exported LCM folders or teacher pipelines (folders or hub ids)
    out: Path = Path("runs/eval")
    prompts: str = "world"  # a prompt set spec (rglcd.prompts)
    limit: int | None = None  # at most this many prompts per group
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: tuple[int, ...] = (25, 50)
    guidance: float | None = None  # LCM guidance; None: the prompt set's (world: 6.0), else LCM_GUIDANCE
    teacher_guidance: float = TEACHER_GUIDANCE
    metrics: list[str] | None = None  # None: the prompt set's defaults
    reward_kwargs: dict[str, dict] = field(default_factory=dict)  # per reward name: constructor arguments
    fid_features: str | None = None  # a name in FID_FEATURES ("inception", the world's "world-judge"); None: the set's
    inception_weights: str | None = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    fid_size: int | None = None  # None: 256 for COCO, the images' own size otherwise
    resolution: int | None = None  # None: each model's native size
    batch_size: int = 16
    seed: int = 0
    samplers: tuple[str, ...] = ("lcm",)  # the LCM models' schedulers: lcm and/or tcd (rglcd.sampling.SAMPLERS)
    etas: tuple[float, ...] = (TCD_ETA,)  # TCD's γ values, one row set each
    speed: SpeedSwitches = field(default_factory=SpeedSwitches)  # channels-last, torch.compile, TF32
    device: str = "auto"  # where models sample and metrics score: auto (the first GPU, else the CPU), cpu, cuda:N
    dtype: str | None = None  # the models' fp16, bf16 or fp32 (rglcd.models.speed); None: bf16 on a GPU, else fp32


@dataclass(frozen=True)
class MetricRequest:
    """What a metric is built from: the prompts (with their records and references), the settings and the device its
    model must be on: the image batches it reads come there."""

    prompts: list[Prompt]
    settings: EvalSettings
    device: torch.device


@dataclass(frozen=True)
class EvalMetric:
    """A registered metric (``--metrics NAME``): what it measures, how it adds its scorers, and what it needs."""

    description: str
    add: Callable[[Scorers, MetricRequest], None]  # adds its per-image or per-set scorer; EvalError if it cannot
    # A metric that needs the teacher as its reference: the per-image measure it reports relative to the teacher's
    # (the teacher row with the most steps), in a column of the metric's name.
    relative_to_teacher: str | None = None


METRICS: Registry[EvalMetric] = Registry("metric")  # besides every registered reward
# A FID feature space: the request -> a FrechetDistance holding the reference images' features.
FID_FEATURES: Registry[Callable[[MetricRequest], FrechetDistance]] = Registry("FID feature extractor")


def register_metric(name: str, description: str, *, relative_to_teacher: str | None = None) -> Callable:
    """Decorator of ``add(scorers, request)``, which puts the scorer into ``scorers.per_image`` (name -> ``f(images,
    texts, records) -> [B]``) or ``scorers.per_set`` (a FrechetDistance-like accumulator). With
    ``relative_to_teacher``, the metric's column is that per-image measure over the teacher's."""

    def decorate(add: Callable[[Scorers, MetricRequest], None]) -> Callable[[Scorers, MetricRequest], None]:
        METRICS.register(name)(EvalMetric(description, add, relative_to_teacher))
        return add

    return decorate


@register_metric(
    "hf_ratio", "share of spectral energy above half Nyquist, relative to the teacher's",
    relative_to_teacher="high_frequency",
)  # fmt: skip
def _high_frequency(scorers: Scorers, request: MetricRequest) -> None:
    scorers.per_image["high_frequency"] = lambda images, texts, records: high_frequency_share(images)


@register_metric("fid", "Fréchet distance to the prompt set's reference images via torchmetrics")
def _fid(scorers: Scorers, request: MetricRequest) -> None:
    features = request.settings.fid_features or prompt_set(request.settings.prompts).fid_features
    try:
        extractor = FID_FEATURES[features]
    except ValueError as error:
        raise EvalError(f"--fid-features: {error}") from error
    scorers.per_set["fid"] = extractor(request)


def parse_model(text: str) -> tuple[str, str]:
    """``LABEL=PATH`` or ``PATH`` (labelled by its folder name); a ``=`` inside a path (``runs/lr=1e-4``) is not a
    label separator, since labels hold no ``/``."""
    label, separator, path = text.partition("=")
    if not separator or "/" in label:
        label, path = "", text
    path = path.strip()
    return (label.strip() or Path(path).name or path), path


def sampler_variants(label: str, settings: EvalSettings) -> list[tuple[str, str, float]]:
    """(label, sampler, eta) of each way an LCM model is sampled: its own label when only LCM's scheduler is asked
    for, else one variant per sampler and TCD γ (``RG-LCM (lcm)``, ``RG-LCM (tcd eta=0.3)``)."""
    unknown = sorted(set(settings.samplers) - set(SAMPLERS))
    if unknown or not settings.samplers:
        raise EvalError(f"--scheduler {','.join(unknown)}: choose from {', '.join(SAMPLERS)}")
    bad = [eta for eta in settings.etas if not 0 <= eta <= 1]
    if bad or not settings.etas:
        raise EvalError(f"--eta {bad[0] if bad else ''}: TCD's γ must be in [0, 1]")
    if tuple(settings.samplers) == ("lcm",):
        return [(label, "lcm", TCD_ETA)]
    variants = []
    for sampler in dict.fromkeys(settings.samplers):
        if sampler == "lcm":
            variants.append((f"{label} (lcm)", "lcm", TCD_ETA))
        else:
            variants += [(f"{label} (tcd eta={eta:g})", "tcd", eta) for eta in dict.fromkeys(settings.etas)]
    return variants


def build_contenders(settings: EvalSettings) -> list[Contender]:
    contenders, labels = [], set()
    lcm_guidance = settings.guidance or prompt_set(settings.prompts).lcm_guidance or LCM_GUIDANCE
    for text in settings.models:
        label, path = parse_model(text)
        if label in labels:
            raise EvalError(f"two models are labelled {label!r}: name them with --model LABEL=PATH")
        labels.add(label)
        kind = pipeline_kind(path)
        # Before any model loads: off the latent grid, images come out smaller than their manifest says.
        problem = settings.resolution and resolution_problem(settings.resolution, pipeline_vae_scale_factor(path))
        if problem:
            raise EvalError(f"{label}: --resolution {problem}")
        if kind == "lcm":
            limit = LCMScheduler.load_config(path, subfolder="scheduler").get("original_inference_steps", 50)
            if max(settings.steps) > limit:
                raise EvalError(f"--steps {max(settings.steps)}: {label} samples at most {limit} steps (its grid)")
            for variant, sampler, eta in sampler_variants(label, settings):
                contenders.append(Contender(variant, Path(path), "lcm", settings.steps, lcm_guidance, sampler, eta))
        else:
            contenders.append(
                Contender(label, Path(path), "teacher", settings.teacher_steps, settings.teacher_guidance)
            )
    if not contenders:
        raise EvalError("no model to evaluate: pass --model PATH (an exported LCM folder or a teacher pipeline)")
    return contenders


def eval_device(settings: EvalSettings) -> torch.device:
    """``settings.device`` as a torch device (``auto``: the first GPU, else the CPU); an EvalError if it is not one."""
    try:
        return pick_device(settings.device)
    except ValueError as error:
        raise EvalError(f"--device {error}") from None


def eval_dtype(settings: EvalSettings) -> torch.dtype:
    """``settings.dtype`` as the torch dtype the models sample in (None: bfloat16 on a GPU, else float32)."""
    try:
        return sampling_dtype(settings.dtype, eval_device(settings))
    except ValueError as error:
        raise EvalError(f"--dtype {error}") from None


def build_metrics(names: Sequence[str], prompts: list[Prompt], settings: EvalSettings) -> Scorers:
    """Every metric's scorers, built (weights loaded, references read) on the settings' device before anything is
    generated. Rewards score in float32 whatever the models' dtype, so scores compare across --dtype."""
    unknown = [name for name in names if name not in METRICS and name not in REWARDS]
    if unknown:
        choices = ", ".join([*REWARDS.names(), *METRICS.names()])
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {choices}")
    scorers = Scorers(per_image={}, per_set={}, benchmark_scales={})
    request = MetricRequest(prompts, settings, eval_device(settings))
    for name in names:
        if name in METRICS:
            METRICS[name].add(scorers, request)
            continue
        try:
            reward = build_reward(name, **settings.reward_kwargs.get(name, {})).to(request.device)
        except (FileNotFoundError, ValueError, TypeError) as error:  # weights missing, bad --reward-kwargs
            raise EvalError(f"metric {name}: {error}") from error
        scorers.per_image[name] = lambda images, texts, records, reward=reward: reward(images, texts)
        scorers.benchmark_scales[name] = reward.benchmark_scale
    return scorers


@FID_FEATURES.register("inception")
def _inception_fid(request: MetricRequest) -> FrechetDistance:
    """Inception-v3 features (torch-fidelity's weights) of the prompts' reference images (COCO)."""
    settings = request.settings
    paths = [prompt.reference for prompt in request.prompts if prompt.reference is not None]
    if not paths:
        raise EvalError("fid needs reference images: use --prompts coco:CAPTIONS_JSON:IMAGES_DIR (or world)")
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise EvalError(f"{len(missing)} reference images are missing, e.g. {missing[0]}")
    if not settings.inception_weights or not Path(settings.inception_weights).is_file():
        raise EvalError(
            "fid with Inception needs its weights as a local file: --inception-weights "
            "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release file; `pip install rglcd[fid]`)"
        )
    try:
        import torch_fidelity  # noqa: F401  (optional: the fid extra; torchmetrics' Inception needs it)
    except ImportError as error:
        raise EvalError("fid with Inception needs torch-fidelity: pip install 'rglcd[fid]'") from error
    batches = (batch for _, batch in read_images(paths, settings.batch_size))
    return FrechetDistance(
        2048, batches, settings.inception_weights, size=settings.fid_size or COCO_FID_SIZE, device=request.device
    )


@dataclass(frozen=True)
class Replicate:
    """A model that is one training seed's run of a recipe."""

    family: str  # the recipe, e.g. "RG-LCM"
    seed: int  # its training seed


@dataclass(frozen=True)
class EvalRun:
    """An evaluation run as its report tells it, beside its settings: the title, the notes that open the report's
    list, what joins ``results.json``, when the run began, and the models that are training seeds' replicates.

    Replicates (by model label) are compared prompt by prompt only with models of their own seed and with the
    teacher; over several seeds the report adds each family's mean and spread across the seeds (and ``contrast``'s
    difference, seed by seed), and the grid shows the first seed's replicates."""

    title: str = "rglcd eval"
    notes: Sequence[str] = ()
    context: Mapping[str, Any] = field(default_factory=dict)  # joins results.json
    started: float | None = None  # a perf_counter: when the whole run began (an experiment's training too); None: now
    replicates: Mapping[str, Replicate] = field(default_factory=dict)
    contrast: tuple[str, str] | None = None  # two families, first − second

    def seeds(self) -> list[int]:
        return sorted({replicate.seed for replicate in self.replicates.values()})


def across_seeds(rows: list[dict], paired: list[dict], run: EvalRun, columns: list[str]) -> tuple[dict, str]:
    """``across_seeds`` for results.json and its tables: each replicate family's spread of the ``columns`` every one
    of its rows has, and the contrast's paired differences (per-image columns) seed by seed."""
    family_of = {label: replicate.family for label, replicate in run.replicates.items()}
    columns = [c for c in columns if all(row.get(c) is not None for row in rows if row["model"] in family_of)]
    per_image = [c for c in columns if paired and isinstance(paired[0].get(c), dict)]  # a set metric (fid) has none
    spreads = family_spreads(rows, family_of, columns)
    summary: dict[str, Any] = {"seeds": run.seeds(), "students": spreads}
    effects = []
    if run.contrast:
        effects = contrast_effects(paired, family_of, run.contrast, per_image)
        summary[re.sub(r"\W+", "_", "_minus_".join(run.contrast).lower())] = effects  # e.g. rg_lcm_minus_lcm
    return {"across_seeds": summary}, seed_tables(run.seeds(), spreads, columns, effects, per_image, run.contrast)


def run_eval(settings: EvalSettings, run: EvalRun = EvalRun()) -> dict:
    """Check everything, generate what is missing, score, and write the report folder as ``run`` describes it."""
    started = time.perf_counter() if run.started is None else run.started
    device, dtype = eval_device(settings), eval_dtype(settings)
    prompts = load_prompts(settings.prompts, settings.limit)
    contenders = build_contenders(settings)
    names = settings.metrics or prompt_set(settings.prompts).metrics
    scorers = build_metrics(names, prompts, settings)

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate(
        contenders,
        [prompt.text for prompt in prompts],
        out,
        scorers,
        records=[prompt.record for prompt in prompts],
        groups=[prompt.group for prompt in prompts],
        seed=settings.seed,
        batch_size=settings.batch_size,
        speed=settings.speed,
        resolution=settings.resolution,
        device=device,
        dtype=dtype,
    )
    paired = []
    if len(prompts) > 1:  # every pair worth comparing, prompt by prompt, on each per-image metric
        seeds = {label: replicate.seed for label, replicate in run.replicates.items()}
        pairs = comparison_pairs(rows, seeds)
        paired = paired_row_differences(pairs, list(scorers.per_image), scorers.benchmark_scales)
    metric_columns = [*scorers.per_image, *scorers.per_set]
    for name in dict.fromkeys(names):  # the metrics declared relative to the teacher (hf_ratio)
        measure = METRICS[name].relative_to_teacher if name in METRICS else None
        if measure is not None:
            relative_to_teacher(rows, measure, name)
            metric_columns.append(name)
    plotted = [*metric_columns, "ms_per_image"]
    columns = [*metric_columns, "ms_per_image", "images_per_second"]
    results = {
        **run.context,
        "settings": {
            **{key: str(value) for key, value in asdict(settings).items()},
            **{"device": str(device), "dtype": str(dtype).removeprefix("torch.")},  # as resolved
        },
        "prompts": {"spec": settings.prompts, "count": len(prompts), "groups": sorted({p.group for p in prompts})},
        "contenders": [{**asdict(c), "path": str(c.path)} for c in contenders],
        "rows": rows,
        "paired_differences": paired,
        "seconds": round(time.perf_counter() - started, 1),
    }
    notes = [
        *run.notes,
        f"{len(prompts)} prompts ({settings.prompts}), prompt i seeded with {settings.seed} + i for every model.",
        f"Sampled on {device} in {str(dtype).removeprefix('torch.')}; rewards and metrics score in float32.",
        "Per-image metrics: mean over the prompts with its 95 % bootstrap interval over the prompts in brackets "
        "(2000 resamplings; `_ci` in results.json, the spread in `_std`), rewards on "
        "their benchmark's scale (HPSv2 and CLIP score: 100 × cosine); group tables follow HPSv2's benchmark "
        f"arithmetic: per group, the mean and std of the means of consecutive chunks of {HPSV2_CHUNK} prompts.",
        f"Whole run: {results['seconds']:.0f} s.",
    ]
    rewards = [name for name in scorers.per_image if name in scorers.benchmark_scales]
    tradeoffs = [("fid", name) for name in rewards] if "fid" in scorers.per_set else []
    sections, grid_rows = [], rows
    if len(run.seeds()) > 1:
        summary, markdown = across_seeds(rows, paired, run, metric_columns)
        results.update(summary)
        sections.append(markdown)
        first_seed = run.seeds()[0]  # the grid: the first seed's replicates beside the other models
        grid_rows = [
            row for row in rows if row["model"] not in run.replicates or run.replicates[row["model"]].seed == first_seed
        ]
    texts = [prompt.text for prompt in prompts]
    write_report(out, run.title, rows, columns, results, notes, texts, tradeoffs, plotted, sections, grid_rows)
    for path in dict.fromkeys(contender.path for contender in contenders if contender.kind == "lcm"):
        labels = {contender.label for contender in contenders if contender.path == path}
        about = f"{len(prompts)} prompts ({settings.prompts}), prompt i seeded {settings.seed} + i; report: {out}."
        add_evaluation_to_card(path, markdown_table([row for row in rows if row["model"] in labels], columns), about)
    return results
