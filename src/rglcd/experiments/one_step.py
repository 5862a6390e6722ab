"""``rglcd world one-step``: distribution matching and an adversarial term beside LCD and the reward, at one step.

Students with the quickstart's recipe (data, steps, seed, batch): **LCM** (β = 0), **RG-LCM** (the quickstart's,
world-clip β), **RG-LCM-K1** (the same reward on the student's own 1-step sample from fresh noise), **DMD** (DMD's
term alone, no LCD, as DMD2 drops its regression loss), **LCD+DMD**, **LCD+DMD+GAN**, **LCD+DMD+GAN+reward** and
**LCD+DMD0.3+reward-K1** (the `world-one-step` preset's recipe); each evaluated at 1, 2 and 4 steps against the
teacher's 50-step DDIM + CFG on the held-out world prompts, with paired 95 % intervals against RG-LCM; then the best
two at one step (judge exact) repeated over more training seeds. Finished students and images are reused; an
interrupted run continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..eval_command import EvalRun, Replicate, run_eval
from ..evaluate import paired_row_differences, strict_json
from ..stats import Estimate
from .quickstart import distil_world_student, prepare_world, world_clip_terms, world_evaluation
from .sampler_reward import training_times

REFERENCE = "RG-LCM"  # what every student is compared with, prompt by prompt
METRICS = ["world-clip", "judge", "fid"]
COMPARED = ["judge_exact", "judge_accuracy", "world-clip"]  # per-image metrics of the paired differences
DMD = ("dmd.weight=1", "dmd.fake_lr=1e-4")  # the DMD students' overrides measured in docs/one-step.md
GAN = ("gan.weight=0.01",)  # added to DMD's for the GAN students
# The reward on what 1-step users get: the student's own 1-step sample from fresh noise (docs/sampler-reward.md).
ONE_STEP_SAMPLE = ("reward.target=sample", "reward.sample_steps=1")
# The world-one-step preset's recipe: world-clip on the 1-step sample beside LCD and DMD at weight 0.3, the best
# 1-step student of the tuning (docs/one-step.md).
ONE_STEP_RECIPE = (*ONE_STEP_SAMPLE, "dmd.weight=0.3", "dmd.fake_lr=1e-4")


@dataclass
class OneStepSettings:
    out: Path = Path("runs/one-step")
    train_steps: int = 600
    reward_beta: float = 0.5  # the quickstart's β on world-clip
    dmd: tuple[str, ...] = DMD  # the DMD students' dmd.* overrides
    gan: tuple[str, ...] = GAN  # the GAN students' gan.* overrides
    prompts: int = 256
    steps: tuple[int, ...] = (1, 2, 4)
    seeds: int = 3  # training seeds of the best two students (the first seed's runs are the table's)
    data_samples: int = 10_000
    seed: int = 0


def student_runs(settings: OneStepSettings) -> dict[str, list[str]]:
    """``rglcd train world`` overrides of every student, by label."""
    plain, rewarded = world_clip_terms(0.0), world_clip_terms(settings.reward_beta)
    dmd, gan = list(settings.dmd), [*settings.dmd, *settings.gan]
    return {
        "LCM": [plain],
        "RG-LCM": [rewarded],
        "RG-LCM-K1": [rewarded, *ONE_STEP_SAMPLE],
        "DMD": [plain, "distill.lcd_weight=0", *dmd],
        "LCD+DMD": [plain, *dmd],
        "LCD+DMD+GAN": [plain, *gan],
        "LCD+DMD+GAN+reward": [rewarded, *gan],
        "LCD+DMD0.3+reward-K1": [rewarded, *ONE_STEP_RECIPE],
    }


def folder_name(label: str, seed: int, first_seed: int) -> str:
    name = label.lower().replace("+", "-")
    return name if seed == first_seed else f"{name}-seed{seed}"


def against_reference(rows: list[dict], labels: list[str]) -> tuple[list[str], list[dict]]:
    """Each student's paired differences (same prompts, same seeds) from RG-LCM at every step count, with 95 %
    bootstrap intervals over the prompts: Markdown lines and their records."""
    by_label = {(row["model"], row["steps"]): row for row in rows}
    header = "| student − RG-LCM | steps | " + " | ".join(f"Δ {name} [95 % CI]" for name in COMPARED) + " |"
    lines, records = [header, "|---|---:|" + "---|" * len(COMPARED)], []
    for label in labels:
        for steps in sorted(steps for model, steps in by_label if model == label):
            if label == REFERENCE or (REFERENCE, steps) not in by_label:
                continue
            (record,) = paired_row_differences([(by_label[label, steps], by_label[REFERENCE, steps])], COMPARED)
            cells = " | ".join(str(Estimate(**record[name])) for name in COMPARED)
            lines.append(f"| {label} − {REFERENCE} | {steps} | {cells} |")
            records.append(record)
    return lines, records


def best_two(rows: list[dict], labels: list[str]) -> list[str]:
    """The two students (not LCM, not RG-LCM) with the highest judge exact at one step."""
    one_step = {row["model"]: row["judge_exact"] for row in rows if row["steps"] == 1 and row["model"] in labels}
    candidates = [label for label in labels if label not in ("LCM", REFERENCE)]
    return sorted(candidates, key=lambda label: -one_step[label])[:2]


def run_one_step(settings: OneStepSettings) -> dict:
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(settings.data_samples)
    runs = student_runs(settings)
    seed = settings.seed
    students = {
        label: distil_world_student(out / folder_name(label, seed, seed), settings.train_steps, seed, overrides)
        for label, overrides in runs.items()
    }
    times = {label: record["median_after_first"] for label, record in training_times(students).items()}
    time_table = ["| student | ms per training step (median) | relative to RG-LCM |", "|---|---:|---:|"]
    time_table += [f"| {label} | {1000 * s:.0f} | {s / times[REFERENCE]:.2f}× |" for label, s in times.items()]
    described = "; ".join(f"**{label}**: {' '.join(overrides)}" for label, overrides in runs.items())
    notes = [
        f"Students distilled for {settings.train_steps} steps with the quickstart's recipe (`rglcd train world`, "
        f"training seed {seed}), with these overrides: {described}.",
        "**judge_exact**: share of prompts with every attribute the independent judge checks found; "
        "**judge_accuracy**: share of attributes found; **world-clip**: the reward; **fid**: Fréchet distance "
        "on the judge's features to fresh renders of the same prompts (lower is better).",
        "Training time per step, this machine (2 cores), batch 32:\n\n" + "\n".join(time_table) + "\n",
    ]
    evaluation = world_evaluation(
        world, students, out, settings.prompts, seed, steps=settings.steps, teacher_steps=(50,), metrics=METRICS
    )
    context = {
        "one_step": {key: str(value) for key, value in vars(settings).items()},
        "runs": runs,
        "training_seconds_per_step": times,
    }
    title = "One step: distribution matching and a GAN beside LCD and the reward, in the miniature world"
    results = run_eval(evaluation, EvalRun(title=title, notes=notes, context=context, started=started))
    lines, results["against_rg_lcm"] = against_reference(results["rows"], list(runs))
    heading = (
        "\n## Each student against RG-LCM\n\nSame prompts, same seeds; the mean difference over the prompts with its "
        "95 % bootstrap interval (2000 resamplings of the prompts). One training seed.\n\n"
    )
    with (out / "report.md").open("a") as report:
        report.write(heading + "\n".join(lines) + "\n")
    (out / "results.json").write_text(strict_json(results, indent=2))
    if settings.seeds > 1:
        results["seeds"] = repeat_over_seeds(settings, world, runs, best_two(results["rows"], list(runs)), started)
    return results


def repeat_over_seeds(settings: OneStepSettings, world, runs, chosen: list[str], started: float) -> dict:
    """RG-LCM and the ``chosen`` students over ``settings.seeds`` training seeds, evaluated in ``out/seeds``."""
    out, first = Path(settings.out), settings.seed
    families = [REFERENCE, *chosen]
    replicates, students = {}, {}
    for seed in range(first, first + settings.seeds):
        for family in families:
            folder = out / folder_name(family, seed, first)
            label = f"{family} seed {seed}"
            students[label] = distil_world_student(folder, settings.train_steps, seed, runs[family])
            replicates[label] = Replicate(family, seed)
    evaluation = world_evaluation(
        world, students, out / "seeds", settings.prompts, first, steps=settings.steps, teacher_steps=(50,),
        metrics=METRICS,
    )  # fmt: skip
    notes = [
        f"RG-LCM and the best two students at one step by judge exact ({', '.join(chosen)}) over "
        f"{settings.seeds} training seeds; each compared with RG-LCM seed by seed.",
    ]
    run = EvalRun(
        title="One step over training seeds", notes=notes, context={"runs": runs}, started=started,
        replicates=replicates, contrast=(chosen[0], REFERENCE),
    )  # fmt: skip
    return run_eval(evaluation, run)
