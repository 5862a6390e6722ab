"""``rglcd world sampler-reward``: the reward on what users sample, against the paper's one-step prediction.

RG-LCD rewards the student's one-step prediction f_θ(z_{t_{n+k}}) from a random noise level; users sample with 2–4
steps from pure noise. With ``reward.target: sample`` the reward reads the student's own K-step sample instead,
backpropagated through its last step (as DRaFT-K does for diffusion models). The quickstart's recipe (same data,
steps, β, seed) is distilled with each target, for the quickstart's world-clip and for the hackable world-aesthetic
of ``rglcd world overoptimisation``, and every student is evaluated at 1, 2 and 4 steps against the teacher: the
rewards, the true colourfulness, the judge's accuracy and Fréchet distance, the high-frequency ratio, and each
run's training time per step. A second table samples the world-clip students with TCD (diffusers' TCDScheduler) at
several γ.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..eval_command import EvalRun, run_eval
from ..evaluate import paired_row_differences, strict_json
from ..stats import Estimate
from .quickstart import distil_world_student, prepare_world, world_clip_terms, world_evaluation


@dataclass
class SamplerRewardSettings:
    out: Path = Path("runs/sampler-reward")
    train_steps: int = 600
    clip_beta: float = 0.5  # the quickstart's β on world-clip
    aesthetic_beta: float = 1.0  # `rglcd world overoptimisation`'s β of direct world-aesthetic
    sample_steps: tuple[int, ...] = (2, 4)  # K of the world-clip students with reward.target = sample
    aesthetic_sample_steps: tuple[int, ...] = (2,)  # K of the world-aesthetic ones
    grad_steps: int = 1
    prompts: int = 256
    steps: tuple[int, ...] = (1, 2, 4)
    etas: tuple[float, ...] = (0.0, 0.3, 0.6, 1.0)  # TCD's γ values of the second table
    data_samples: int = 10_000
    seed: int = 0


def sampled(sample_steps: int, grad_steps: int) -> list[str]:
    """The overrides of ``reward.target: sample`` with K = ``sample_steps``."""
    return ["reward.target=sample", f"reward.sample_steps={sample_steps}", f"reward.grad_steps={grad_steps}"]


def student_runs(settings: SamplerRewardSettings) -> dict[str, list[str]]:
    """``rglcd train world`` overrides of every student, by label."""
    clip = world_clip_terms(settings.clip_beta)
    aesthetic = f"reward.terms=[{{name: world-aesthetic, beta: {settings.aesthetic_beta}}}]"
    runs = {"LCM": [world_clip_terms(0.0)], "clip prediction": [clip]}
    runs.update({f"clip sample K{k}": [clip, *sampled(k, settings.grad_steps)] for k in settings.sample_steps})
    runs["aesthetic prediction"] = [aesthetic]
    for k in settings.aesthetic_sample_steps:
        runs[f"aesthetic sample K{k}"] = [aesthetic, *sampled(k, settings.grad_steps)]
    return runs


def folder_name(label: str) -> str:
    return label.lower().replace(" ", "-")


def training_times(students: dict[str, Path]) -> dict[str, dict]:
    """Each run's seconds per optimizer step (median and mean after the first) from its train_summary.json."""
    times = {}
    for label, student in students.items():
        summary = json.loads((student.parent / "train_summary.json").read_text())["step_seconds"]
        times[label] = {key: summary[key] for key in ("steps", "median_after_first", "mean_after_first")}
    return times


REWARDS = {"clip": "world-clip", "aesthetic": "world-aesthetic"}  # a label's first word: the reward it was trained on


def prediction_twin(label: str) -> str:
    """The paper's-target student a label is compared with: its reward's ``prediction`` run (the LCM's: clip's)."""
    family = label.partition(" ")[0]
    return f"{family if family in REWARDS else 'clip'} prediction"


def comparisons(runs: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(first, second, the reward they were trained on): each sample-target student against its prediction-target
    twin, and the paper's RG-LCM against the LCM."""
    pairs = [("clip prediction", "LCM", REWARDS["clip"])]
    for label in runs:
        if " sample " in label:
            pairs.append((label, prediction_twin(label), REWARDS[label.partition(" ")[0]]))
    return pairs


def focused_differences(rows: list[dict], pairs: list[tuple[str, str, str]]) -> tuple[list[str], list[dict]]:
    """Per pair and step count, the paired difference (same prompts, same seeds) of the trained-on reward and of the
    judge's accuracy with 95 % bootstrap intervals over the prompts: Markdown lines and their records."""
    by_label = {(row["model"], row["steps"]): row for row in rows}
    lines = ["| first − second | steps | Δ reward [95 % CI] | Δ judge accuracy [95 % CI] |", "|---|---:|---|---|"]
    records = []
    for first, second, reward in pairs:
        for steps in sorted(steps for model, steps in by_label if model == first):
            (record,) = paired_row_differences(
                [(by_label[first, steps], by_label[second, steps])], [reward, "judge_accuracy"]
            )
            delta_reward, delta_judge = (Estimate(**record[name]) for name in (reward, "judge_accuracy"))
            lines.append(f"| {first} − {second} | {steps} | {reward} {delta_reward} | {delta_judge} |")
            records.append({**record, "reward": reward})
    return lines, records


def run_sampler_reward(settings: SamplerRewardSettings) -> dict:
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(settings.data_samples)
    runs = student_runs(settings)
    students = {
        label: distil_world_student(out / folder_name(label), settings.train_steps, settings.seed, overrides)
        for label, overrides in runs.items()
    }
    times = training_times(students)
    time_table = ["| student | ms per training step (median) | relative to prediction |", "|---|---:|---:|"]
    for label, record in times.items():
        reference = times[prediction_twin(label)]
        ratio = record["median_after_first"] / reference["median_after_first"]
        time_table.append(f"| {label} | {1000 * record['median_after_first']:.0f} | {ratio:.2f}× |")
    notes = [
        f"Students distilled for {settings.train_steps} steps with the quickstart's recipe (seed {settings.seed}): "
        f"**LCM** (β = 0); **clip** (world-clip, β = {settings.clip_beta}) and **aesthetic** (world-aesthetic, "
        f"β = {settings.aesthetic_beta}), each with the reward on the one-step **prediction** (the paper) or on the "
        f"student's own **sample** of K steps from fresh noise (reward.target = sample), backpropagated through its "
        f"last {settings.grad_steps} step(s).",
        "**world-clip** / **world-aesthetic**: the rewards; **colorfulness**: the true colourfulness world-aesthetic "
        "regresses; **judge_accuracy** / **fid**: the independent judge's attribute accuracy and Fréchet distance on "
        "its features to fresh renders; **hf_ratio**: high-frequency energy relative to the teacher's.",
        "Training time per step, this machine (2 cores), batch 32:\n\n" + "\n".join(time_table) + "\n",
    ]
    evaluation = world_evaluation(
        world, students, out, settings.prompts, settings.seed, steps=settings.steps, teacher_steps=(50,),
        metrics=["world-clip", "world-aesthetic", "colorfulness", "judge", "fid", "hf_ratio"],
    )  # fmt: skip
    context = {
        "sampler_reward": {key: str(value) for key, value in vars(settings).items()},
        "runs": runs,
        "training_seconds_per_step": times,
    }
    title = "The reward on what users sample, in the miniature world"
    results = run_eval(evaluation, EvalRun(title=title, notes=notes, context=context, started=started))
    lines, results["focused_differences"] = focused_differences(results["rows"], comparisons(runs))
    heading = (
        "\n## Each target against the paper's\n\nSame prompts, same seeds; the mean difference over the prompts "
        "with its 95 % bootstrap interval (2000 resamplings of the prompts). One training seed: seed-to-seed spread "
        "is not in these intervals.\n\n"
    )
    with (out / "report.md").open("a") as report:
        report.write(heading + "\n".join(lines) + "\n")
    (out / "results.json").write_text(strict_json(results, indent=2))
    # TCD's γ: the world-clip students sampled with diffusers' TCDScheduler beside their LCMScheduler.
    clip_students = {label: path for label, path in students.items() if label == "LCM" or label.startswith("clip")}
    tcd = world_evaluation(
        world, clip_students, out / "tcd", settings.prompts, settings.seed, steps=settings.steps, teacher_steps=(50,),
        metrics=["world-clip", "judge", "fid", "hf_ratio"],
    )  # fmt: skip
    tcd = replace(tcd, samplers=("lcm", "tcd"), etas=settings.etas)
    tcd_notes = [
        "The world-clip students of ../report.md sampled with their LCMScheduler (**lcm**) and with diffusers' "
        "TCDScheduler (**tcd eta=γ**: each step moves the estimate to s = ⌊(1 − γ)·t_next⌋ along the predicted "
        "noise, then re-noises it to t_next; γ = 0 is deterministic).",
    ]
    tcd_title = "TCD sampling of the world students"
    results["tcd"] = run_eval(tcd, EvalRun(title=tcd_title, notes=tcd_notes, context={"runs": runs}, started=started))
    return results
