"""``rglcd quickstart``: the whole method in the miniature world, end to end on a CPU.

World data, teacher, rewards and judge come from the cache (``cache_dir()/world``), else from the weights
shipped with the package, else they are trained. Then an LCM (β = 0) and an RG-LCM (world-clip guidance) are
distilled from the teacher with ``rglcd train``, and everything is evaluated on held-out prompts with the
judge: the teacher's DDIM + CFG at 50 and 25 steps against both students at 1, 2 and 4 steps.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import load_config
from ..evaluate import Contender, comparison_grid, evaluate, markdown_table
from .data import eval_scenes, write_world_shards
from .paths import EVAL_SEED, cache_dir, shipped_dir
from .render import render, rerender

TEACHER_GUIDANCE = 7.5  # diffusers' default CFG scale for the DDIM baseline
STUDENT_GUIDANCE = 6.0  # LCM pipelines' guidance (the student sees w = guidance − 1, inside [w_min, w_max])
COLUMNS = ["reward", "judge_accuracy", "judge_fd", "ms_per_image"]


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    train_steps: int = 600
    reward_beta: float = 0.5
    prompts: int = 64
    data_samples: int = 10_000
    seed: int = 0


def world_asset(name: str, make: Callable[[Path], object]) -> Path:
    """``cache/world/<name>``: copied from the shipped weights when they exist, else made by ``make``."""
    target = cache_dir() / "world" / name
    if not target.exists():
        shipped = shipped_dir() / name
        partial = target.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if shipped.is_dir():
            shutil.copytree(shipped, partial)
        else:
            make(partial)
        partial.rename(target)
    return target


def prepare_world(data_samples: int) -> dict[str, Path]:
    from .judge import train_judge
    from .rewards import train_world_aesthetic, train_world_clip
    from .teacher import train_world_teacher

    return {
        "data": world_asset("data", lambda out: write_world_shards(out, data_samples)),
        "teacher": world_asset("teacher", train_world_teacher),
        "clip": world_asset("clip", train_world_clip),
        "aesthetic": world_asset("aesthetic", train_world_aesthetic),
        "judge": world_asset("judge", train_judge),
    }


def distil(out: Path, overrides: list[str]) -> Path:
    """``rglcd train world`` (the cached world teacher and data) into ``out``; reused when its student exists."""
    from ..train import train

    if (out / "student" / "model_index.json").is_file():
        return out / "student"
    return train(load_config("world", [f"logging.output_dir={out}", *overrides]))


def world_clip_run(settings: QuickstartSettings, reward_beta: float) -> list[str]:
    """Overrides of the quickstart's students: world-clip guidance with ``reward_beta`` (0: plain LCD)."""
    terms = f"[{{name: world-clip, beta: {reward_beta}}}]" if reward_beta else "[]"
    return [f"optim.max_train_steps={settings.train_steps}", f"seed={settings.seed}", f"reward.terms={terms}"]


def judge_metrics(judge_folder: Path, prompts: list) -> tuple[dict, dict]:
    """The judge's metrics for held-out scenes: per image, the fraction of prompted attributes found; per set,
    the Fréchet distance of the judge's features to those of fresh renders of the same prompts."""
    from .judge import Judge, frechet_distance

    judge = Judge.load(judge_folder)
    references = torch.from_numpy(
        np.stack([np.asarray(render(rerender(scene, EVAL_SEED + i))) for i, scene in enumerate(prompts)])
    ).permute(0, 3, 1, 2).float() / 255  # fmt: skip
    reference_features = judge.features(references)
    per_image = {"judge_accuracy": lambda images, texts, records: judge.attribute_scores(images, records)}
    per_set = {"judge_fd": lambda images, texts, records: frechet_distance(reference_features, judge.features(images))}
    return per_image, per_set


def run_quickstart(settings: QuickstartSettings) -> dict:
    from ..rewards import build_reward

    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(settings.data_samples)
    students = {
        "LCM": distil(out / "lcm", world_clip_run(settings, reward_beta=0.0)),
        "RG-LCM": distil(out / "rg-lcm", world_clip_run(settings, reward_beta=settings.reward_beta)),
    }

    prompts = eval_scenes(settings.prompts)
    captions = [scene.caption for scene in prompts]
    reward = build_reward("world-clip", weights=world["clip"])
    per_image, per_set = judge_metrics(world["judge"], prompts)
    contenders = [
        Contender("teacher DDIM+CFG", world["teacher"], "teacher", (50, 25), TEACHER_GUIDANCE),
        Contender("LCM", students["LCM"], "lcm", (1, 2, 4), STUDENT_GUIDANCE),
        Contender("RG-LCM", students["RG-LCM"], "lcm", (1, 2, 4), STUDENT_GUIDANCE),
    ]
    rows = evaluate(
        contenders,
        captions,
        out / "eval",
        per_image_metrics={"reward": lambda images, texts, records: reward(images, texts), **per_image},
        set_metrics=per_set,
        records=prompts,
        seed=settings.seed,
    )
    results = {
        "settings": {key: str(value) for key, value in vars(settings).items()},
        "world": {key: str(value) for key, value in world.items()},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(out, rows, results)
    return results


def write_report(out: Path, rows: list[dict], results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    grid = comparison_grid(rows, list(range(8)), out / "grid.png")
    table = markdown_table(rows, COLUMNS)
    text = f"""# rglcd quickstart: RG-LCD in the miniature world

{table}

- **reward**: world-clip score (cosine) of the image and its prompt; **judge_accuracy**: fraction of the
  prompt's attributes the independent judge finds; **judge_fd**: Fréchet distance between the judge's
  features of the generated images and of fresh renders of the same prompts (lower is better);
  **ms_per_image**: generation time, batch of 32, this machine.
- {results["settings"]["prompts"]} held-out prompts, the same noise for every model.
- Columns of `{grid.name}`: {", ".join(f"{row['model']} {row['steps']}" for row in rows)}; rows: the first 8 prompts.
- Whole run: {results["seconds"]:.0f} s.

![samples]({grid.name})
"""
    (out / "report.md").write_text(text)
    tqdm.write(table)
