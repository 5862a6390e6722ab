"""``rglcd quickstart``: the whole method in the miniature world, end to end on a CPU.

World data, teacher, rewards and judge come from the cache (``cache_dir()/world``), else from the weights
shipped with the package, else they are trained. Then an LCM (β = 0) and an RG-LCM (world-clip guidance) are
distilled from the teacher with ``rglcd train``, and everything is evaluated on held-out prompts with the
judge: the teacher's DDIM + CFG at 50 and 25 steps against both students at 1, 2 and 4 steps. With ``seeds`` > 1
each student is distilled once per training seed, and the report adds the mean and spread across seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import load_config
from ..eval_command import EvalRun, EvalSettings, Replicate, run_eval
from ..train import train
from ..train.checkpoints import checkpoints
from ..world.data import write_world_shards
from ..world.judge import train_judge
from ..world.paths import world_asset
from ..world.rewards import train_world_aesthetic, train_world_clip
from ..world.teacher import train_world_teacher

TEACHER_LABEL = "teacher DDIM+CFG"
METRICS = ["world-clip", "judge", "fid"]


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    train_steps: int = 600
    reward_beta: float = 0.5
    prompts: int = 256
    data_samples: int = 10_000
    seed: int = 0  # the first training seed, and the evaluation's seed (the same prompts and noise for every model)
    seeds: int = 1  # training seeds per student: seed, seed + 1, ...


@dataclass(frozen=True)
class Student:
    family: str  # "LCM" or "RG-LCM"
    seed: int
    label: str  # the model's name in the report: the family, with its seed when there are several
    folder: Path


def students_to_distil(settings: QuickstartSettings) -> list[Student]:
    """Both students for every training seed; the first seed's stay in ``out/lcm`` and ``out/rg-lcm``."""
    students = []
    for offset in range(settings.seeds):
        seed = settings.seed + offset
        for family in ("LCM", "RG-LCM"):
            label = family if settings.seeds == 1 else f"{family} seed {seed}"
            folder = settings.out / (family.lower() if offset == 0 else f"{family.lower()}-seed{seed}")
            students.append(Student(family, seed, label, folder))
    return students


def prepare_world(data_samples: int) -> dict[str, Path]:
    return {
        "data": world_asset("data", lambda out: write_world_shards(out, data_samples)),
        "teacher": world_asset("teacher", train_world_teacher),
        "clip": world_asset("clip", train_world_clip),
        "aesthetic": world_asset("aesthetic", train_world_aesthetic),
        "judge": world_asset("judge", train_judge),
    }


def distil_world_student(out: Path, train_steps: int, seed: int, overrides: list[str]) -> Path:
    """``rglcd train world`` (the cached world teacher and data) for ``train_steps`` steps into ``out``; reused
    when its student exists, continued from its last checkpoint when it was interrupted, started again when it was
    interrupted before its first checkpoint (nothing of it to keep)."""
    if (out / "student" / "model_index.json").is_file():
        return out / "student"
    common = [f"logging.output_dir={out}", f"optim.max_train_steps={train_steps}", f"seed={seed}"]
    config = load_config("world", [*common, *overrides])
    return train(config, resume="latest") if checkpoints(out) else train(config, overwrite=True)


def world_evaluation(world: dict[str, Path], students: dict[str, Path], out: Path, prompts: int, seed: int, **kwargs):
    """The world experiments' :class:`EvalSettings`: the world teacher and ``students`` on ``prompts`` held-out
    world prompts, batches of 32; ``kwargs`` set the rest (steps, metrics, ...)."""
    models = [f"{TEACHER_LABEL}={world['teacher']}", *(f"{label}={path}" for label, path in students.items())]
    return EvalSettings(models=models, out=out, prompts=f"world:{prompts}", batch_size=32, seed=seed, **kwargs)


def world_clip_terms(reward_beta: float) -> str:
    """The quickstart students' reward: world-clip guidance with ``reward_beta`` (0: plain LCD)."""
    return "reward.terms=" + (f"[{{name: world-clip, beta: {reward_beta}}}]" if reward_beta else "[]")


def quickstart_models(out: Path) -> list[str]:
    """``LABEL=PATH`` of the world teacher and the first seed's students of the quickstart in ``out``."""
    students = {"LCM": out / "lcm" / "student", "RG-LCM": out / "rg-lcm" / "student"}
    missing = [str(path) for path in students.values() if not (path / "model_index.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no quickstart students in {out} ({', '.join(missing)}): run `rglcd quickstart` first, or pass --model"
        )
    teacher = world_asset("teacher")
    return [f"{TEACHER_LABEL}={teacher}", *(f"{label}={path}" for label, path in students.items())]


def run_quickstart(settings: QuickstartSettings) -> dict:
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(settings.data_samples)
    students = students_to_distil(settings)
    for student in students:
        beta = settings.reward_beta if student.family == "RG-LCM" else 0.0
        distil_world_student(student.folder, settings.train_steps, student.seed, [world_clip_terms(beta)])
    evaluation = world_evaluation(
        world, {student.label: student.folder / "student" for student in students}, out, settings.prompts,
        settings.seed, steps=(1, 2, 4), teacher_steps=(50, 25), metrics=METRICS,
    )  # fmt: skip
    notes = [
        "**world-clip**: the reward (cosine of image and prompt embeddings); **judge_accuracy**: fraction of the "
        "prompt's attributes the independent judge finds; **judge_exact**: share of prompts with every attribute "
        "found; **fid**: Fréchet distance between the judge's features "
        "of the generated images and of fresh renders of the same prompts (lower is better); **ms_per_image**: "
        "generation time, batch of 32, this machine.",
        f"Students distilled for {settings.train_steps} steps with {settings.seeds} training seed(s) "
        f"({', '.join(str(s.seed) for s in students[::2])}); the RG-LCM with β = {settings.reward_beta} on "
        "world-clip." + (" The grid shows the first seed's students." if settings.seeds > 1 else ""),
    ]
    context = {
        "quickstart": {key: str(value) for key, value in vars(settings).items()},
        "world": {key: str(value) for key, value in world.items()},
    }
    run = EvalRun(
        title="rglcd quickstart: RG-LCD in the miniature world", notes=notes, context=context, started=started,
        replicates={student.label: Replicate(student.family, student.seed) for student in students},
        contrast=("RG-LCM", "LCM"),
    )  # fmt: skip
    return run_eval(evaluation, run)
