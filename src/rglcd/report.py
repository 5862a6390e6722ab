"""Evaluation reports: ``results.json``, ``report.md`` (tables), a sample grid and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from PIL import Image
from tqdm.auto import tqdm

from .evaluate import image_path, strict_json
from .grid import labelled_grid, steps_text


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """One line per (model, steps), one column per metric: its value, and for a per-image metric the 95 % bootstrap
    interval of its mean over the prompts (``<metric>_ci``) in brackets."""
    header = "| model | steps | " + " | ".join(columns) + " |"
    rule = "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"
    lines = [header, rule]
    for row in rows:
        cells = [format_number(row.get(column)) + _interval(row.get(f"{column}_ci")) for column in columns]
        lines.append(f"| {row['model']} | {row['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_tables(rows: list[dict]) -> str:
    """Per metric, a table of mean ± std per prompt group (HPSv2's chunk statistics) and the overall average."""
    if not rows or "groups" not in rows[0]:
        return ""
    sections = []
    for metric, first in rows[0]["groups"].items():
        groups = list(first)
        lines = [
            f"**{metric}** by group (mean ± std over chunks of the group's prompts; no ± for a group of one chunk)",
            "",
        ]
        lines.append("| model | steps | " + " | ".join(groups) + " |")
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in groups) + " |")
        for row in rows:
            cells = []
            for group in groups:
                stats = row["groups"][metric][group]  # one chunk, or the average: no spread to show
                spread = "" if stats["std"] is None else f" ± {format_number(stats['std'])}"
                cells.append(format_number(stats["mean"]) + spread)
            lines.append(f"| {row['model']} | {row['steps']} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


PAIRED_LINES = 60  # the report lists this many pairs at most; results.json holds them all


def paired_table(records: list[dict]) -> str:
    """The paired differences (:func:`rglcd.evaluate.paired_row_differences`): one line per pair, one column per metric,
    the mean difference with its 95 % bootstrap interval."""
    if not records:
        return ""
    names = [key for key in records[0] if key not in ("first", "first_steps", "second", "second_steps")]
    lines = [
        "**Paired differences** (first − second on the same prompts and seeds: the mean over the prompts and its 95 % "
        "bootstrap interval)",
        "",
        "| first | second | " + " | ".join(f"Δ {name}" for name in names) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for record in records[:PAIRED_LINES]:
        cells = [
            f"{format_number(d['mean'])} [{format_number(d['low'])}, {format_number(d['high'])}]"
            if (d := record[name])
            else "—"
            for name in names
        ]
        first, second = f"{record['first']} {record['first_steps']}", f"{record['second']} {record['second_steps']}"
        lines.append(f"| {first} | {second} | " + " | ".join(cells) + " |")
    if len(records) > PAIRED_LINES:
        lines += ["", f"{len(records) - PAIRED_LINES} more pairs in results.json (`paired_differences`)."]
    return "\n".join(lines)


def _spread_cell(figure: dict) -> str:
    if figure["sd"] is None:
        return format_number(figure["mean"])
    low, high = format_number(figure["min"]), format_number(figure["max"])
    return f"{format_number(figure['mean'])} ± {format_number(figure['sd'])} ({low} to {high})"


def seed_tables(
    seeds: list[int],
    spreads: list[dict],
    columns: list[str],
    effects: list[dict],
    effect_columns: list[str],
    contrast: tuple[str, str] | None,
) -> str:
    """The markdown of a run's replicates across training seeds: each family's spread
    (:func:`rglcd.stats.family_spreads`), then the ``contrast``'s effects (:func:`rglcd.stats.contrast_effects`)."""
    lines = [
        f"**Across training seeds** ({len(seeds)}: {', '.join(map(str, seeds))}): each student's mean ± standard "
        "deviation over the seeds (lowest to highest); each seed's per-prompt 95 % intervals are in the table above.",
        "",
        "| model | steps | " + " | ".join(columns) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |",
        *(
            f"| {s['model']} | {s['steps']} | " + " | ".join(_spread_cell(s[c]) for c in columns) + " |"
            for s in spreads
        ),
    ]
    if contrast is None:
        return "\n".join(lines)
    lines += [
        "",
        f"**{contrast[0]} − {contrast[1]}, seed by seed**: each seed's paired difference over the same prompts and "
        "noise, as mean ± standard deviation over the seeds; in brackets, how many seeds' own 95 % intervals lie "
        "above / below zero.",
        "",
        "| steps | " + " | ".join(f"Δ {c}" for c in effect_columns) + " |",
        "| ---: | " + " | ".join("---:" for _ in effect_columns) + " |",
    ]
    for effect in effects:
        cells = [
            f"{_spread_cell(effect[c])} [{effect[c]['above_zero']}↑ {effect[c]['below_zero']}↓]" for c in effect_columns
        ]
        lines.append(f"| {effect['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(bounds: list[float] | None) -> str:
    return "" if bounds is None else f" [{format_number(bounds[0])}, {format_number(bounds[1])}]"


def format_number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)


def comparison_grid(rows: list[dict], prompts: list[str], path: Path) -> Path:
    """A labelled PNG (``grid.labelled_grid``): one row per prompt (the first ``len(prompts)`` of the written
    images), one column per (model, steps), read from the written images."""
    tiles = [
        [Image.open(image_path(Path(row["images"]), index)).convert("RGB") for row in rows]
        for index in range(len(prompts))
    ]
    headers = [f"{row['model']}\n{steps_text(row['steps'])}" for row in rows]
    labelled_grid(tiles, headers, prompts).save(path)
    return path


def _axes():
    """A small matplotlib figure and its axes, drawn off screen."""
    matplotlib.use("Agg")  # files only, no display
    return plt.subplots(figsize=(5, 3.5))


def _save(figure, axes, x_label: str, y_label: str, path: Path) -> Path:
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _error_bars(chosen: list[dict], metric: str) -> list[list[float]] | None:
    """matplotlib's [below, above] distances to each point's 95 % interval (``<metric>_ci``); None if none has one."""
    intervals = [row.get(f"{metric}_ci") for row in chosen]
    if not any(intervals):
        return None
    below = [row[metric] - ci[0] if ci else 0.0 for row, ci in zip(chosen, intervals, strict=True)]
    above = [ci[1] - row[metric] if ci else 0.0 for row, ci in zip(chosen, intervals, strict=True)]
    return [below, above]


def plot_metrics(rows: list[dict], metrics: list[str], out: Path) -> list[Path]:
    """``plot-<metric>.png``: the metric against the number of steps, one line per model (log-2 step axis), with
    the 95 % bootstrap interval as error bars where the metric has one."""
    paths = []
    models = list(dict.fromkeys(row["model"] for row in rows))
    for metric in metrics:
        figure, axes = _axes()
        for model in models:
            chosen = sorted(
                (row for row in rows if row["model"] == model and row.get(metric) is not None), key=lambda r: r["steps"]
            )
            if chosen:
                axes.errorbar(
                    [row["steps"] for row in chosen], [row[metric] for row in chosen],
                    yerr=_error_bars(chosen, metric), marker="o", capsize=3, label=model,
                )  # fmt: skip
        axes.set_xscale("log", base=2)
        intervals = any(row.get(f"{metric}_ci") for row in rows)
        y_label = f"{metric} (95 % interval)" if intervals else metric
        paths.append(_save(figure, axes, "sampling steps", y_label, out / f"plot-{metric}.png"))
    return paths


def plot_tradeoff(rows: list[dict], x_metric: str, y_metric: str, out: Path) -> Path:
    """``plot-<y>-vs-<x>.png``: one point per (model, steps), labelled with the steps, with 95 % intervals."""
    figure, axes = _axes()
    for model in dict.fromkeys(row["model"] for row in rows):
        chosen = [row for row in rows if row["model"] == model]
        axes.errorbar(
            [row[x_metric] for row in chosen], [row[y_metric] for row in chosen],
            xerr=_error_bars(chosen, x_metric), yerr=_error_bars(chosen, y_metric), fmt="o", capsize=3, label=model,
        )  # fmt: skip
        for row in chosen:
            axes.annotate(str(row["steps"]), (row[x_metric], row[y_metric]), fontsize=7)
    return _save(figure, axes, x_metric, y_metric, out / f"plot-{y_metric}-vs-{x_metric}.png")


def write_report(
    out: Path,
    title: str,
    rows: list[dict],
    columns: list[str],
    results: dict,
    notes: list[str],
    prompts: list[str],
    tradeoffs: Sequence[tuple[str, str]] = (),
    plotted: list[str] | None = None,
    sections: Sequence[str] = (),
    grid_rows: list[dict] | None = None,
    grid_prompts: int = 8,
) -> str:
    """``results.json``, ``grid.png`` (the first ``grid_prompts`` of ``prompts`` × each of ``grid_rows``, default
    every row), plots of the ``plotted`` columns against steps and of the ``tradeoffs`` (x, y) pairs, and
    ``report.md`` (the main table, then ``sections``). Returns the main table (also printed)."""
    (out / "results.json").write_text(strict_json(results, indent=2))
    grid = comparison_grid(grid_rows or rows, prompts[:grid_prompts], out / "grid.png")
    if plotted is None:  # every numeric column
        plotted = [column for column in columns if any(isinstance(row.get(column), float) for row in rows)]
    plots = plot_metrics(rows, plotted, out) + [plot_tradeoff(rows, x, y, out) for x, y in tradeoffs]
    table = markdown_table(rows, columns)
    extra = "\n\n".join(sections)
    bullets = "\n".join(f"- {note}" for note in notes)
    figures = "\n".join(f"![{path.stem}]({path.name})" for path in plots)
    text = f"""# {title}

{table}

{extra}

{group_tables(rows)}

{paired_table(results.get("paired_differences", []))}

{bullets}
- `{grid.name}`: one column per (model, steps), one row per prompt (the first {min(grid_prompts, len(prompts))}).

![samples]({grid.name})

{figures}
"""
    (out / "report.md").write_text(text.replace("\n\n\n\n", "\n\n"))
    tqdm.write(table)
    return table
