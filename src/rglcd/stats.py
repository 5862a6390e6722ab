"""Pure statistics of evaluation scores: bootstrap intervals, paired differences, HPSv2's per-group chunk arithmetic,
and spreads across training seeds. No I/O, no models: lists of numbers and the row dicts ``rglcd eval`` writes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

HPSV2_CHUNK = 80  # HPSv2's benchmark: 800 prompts per style in 10 chunks of 80


def chunk_statistics(scores: Sequence[float], chunk: int = HPSV2_CHUNK) -> tuple[float, float]:
    """HPSv2's benchmark arithmetic for one style: the means of consecutive chunks of ``chunk`` scores (in prompt
    order; a shorter last chunk counts as one), then the mean and the population std (ddof 0) of those means."""
    if not scores:
        raise ValueError("no scores")
    means = [float(np.mean(scores[start : start + chunk])) for start in range(0, len(scores), chunk)]
    return float(np.mean(means)), float(np.std(means))


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


def paired_differences(
    first: Mapping[str, Sequence[float]],
    second: Mapping[str, Sequence[float]],
    names: Sequence[str],
    scales: Mapping[str, float] | None = None,
) -> dict[str, dict | None]:
    """Per metric of ``names``: the :func:`paired_difference` (as a dict) of two models' per-item values on the
    metric's benchmark scale (``scales``, default 1), over the items both have a value for (NaN: the metric does not
    apply to that prompt); None with fewer than 2 such items."""
    scales = scales or {}
    differences = {}
    for name in names:
        scale = scales.get(name, 1.0)
        a, b = (scale * np.asarray(values[name], dtype=float) for values in (first, second))
        both = ~(np.isnan(a) | np.isnan(b))
        differences[name] = asdict(paired_difference(a[both], b[both])) if both.sum() > 1 else None
    return differences


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), lowest and highest of one figure across seeds."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def family_spreads(rows: list[dict], family_of: Mapping[str, str], columns: list[str]) -> list[dict]:
    """Per model family (a recipe trained with several seeds) and steps, each column's :func:`spread` over the
    family's rows (one per seed)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row["model"] in family_of:
            groups.setdefault((family_of[row["model"]], row["steps"]), []).append(row)
    return [
        {"model": family, "steps": steps, **{column: spread([row[column] for row in group]) for column in columns}}
        for (family, steps), group in groups.items()
    ]


def contrast_effects(
    paired: list[dict], family_of: Mapping[str, str], contrast: tuple[str, str], columns: list[str]
) -> list[dict]:
    """Per steps, family ``contrast[0]`` − family ``contrast[1]``: each seed's paired difference (same prompts and
    noise, from :func:`paired_differences` records), its :func:`spread` over the seeds, and how many seeds' own 95 %
    intervals lie above and below zero."""
    by_steps: dict[int, list[dict]] = {}
    for record in paired:
        first, second = family_of.get(record["first"]), family_of.get(record["second"])
        if (first, second) in (contrast, contrast[::-1]):
            sign = 1.0 if first == contrast[0] else -1.0  # records are first − second in row order
            bounds = {c: sorted((sign * record[c]["low"], sign * record[c]["high"])) for c in columns}
            by_steps.setdefault(record["first_steps"], []).append(
                {c: (*bounds[c], sign * record[c]["mean"]) for c in columns}
            )  # per column: (low, high, mean) of the contrast
    return [
        {
            "steps": steps,
            **{
                c: {
                    **spread([seed[c][2] for seed in seeds]),
                    "above_zero": sum(seed[c][0] > 0 for seed in seeds),
                    "below_zero": sum(seed[c][1] < 0 for seed in seeds),
                }
                for c in columns
            },
        }
        for steps, seeds in sorted(by_steps.items())
    ]
