"""`rglcd quickstart`'s report, its reuse of finished work on a second run, and the summary across training seeds.

The quickstart runs end to end in one place, the README's commands (``tests/test_cli.py::
test_readme_rglcd_commands_run``, a fresh cache of the shipped world weights): it calls the checks here on the
folder the README's ``rglcd quickstart`` wrote."""

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from rglcd.grid import GAP, ROW_LABEL_WIDTH
from rglcd.stats import contrast_effects, family_spreads, spread

CI_SIZE = ["--train-steps", "2", "--prompts", "8"]  # what the README test adds to `rglcd quickstart`


def check_the_report(out: Path) -> None:
    """What a first ``rglcd quickstart`` (at ``CI_SIZE``) leaves in ``out``."""
    results = json.loads((out / "results.json").read_text())
    rows = [(row["model"], row["steps"]) for row in results["rows"]]
    assert rows == [("teacher DDIM+CFG", 50), ("teacher DDIM+CFG", 25)] + [
        (model, steps) for model in ("LCM", "RG-LCM") for steps in (1, 2, 4)
    ]
    for row in results["rows"]:
        assert 0 <= row["judge_accuracy"] <= 1 and row["fid"] >= 0 and row["ms_per_image"] > 0
        assert -1 <= row["world-clip"] <= 1
    report = (out / "report.md").read_text()
    assert (
        "| model | steps | world-clip | judge_accuracy | judge_exact | fid | ms_per_image | images_per_second |"
        in report
    )
    main_table = report.split("\n\n")[1]
    assert main_table.count("\n| RG-LCM |") == 3 and "**world-clip** by group" in report
    grid = Image.open(out / "grid.png")  # 8 prompts × (teacher at 2 step counts, 2 students at 3): 32 px shown at 128
    assert grid.width == ROW_LABEL_WIDTH + 8 * (128 + GAP) - GAP and grid.height > 8 * (128 + GAP)
    assert "across_seeds" not in results and "Across training seeds" not in report
    card = (out / "rg-lcm" / "student" / "README.md").read_text()  # rglcd eval adds its table to the model card
    assert "## Evaluation (`rglcd eval`)" in card and "| RG-LCM | 2 |" in card and "| LCM | 2 |" not in card
    assert "world-clip (β 0.5)" in card
    rg_config = (out / "rg-lcm" / "config.yaml").read_text()
    assert "world-clip" in rg_config and "name: world-clip" not in (out / "lcm" / "config.yaml").read_text()


def check_reuse_and_seeds(out: Path, quickstart: Callable[..., object]) -> None:
    """``quickstart(*extra)`` runs ``rglcd quickstart`` (at ``CI_SIZE``) again on ``out``: the second run distils and
    generates nothing again; with ``--seeds 2`` the first seed's students are reused and the second seed's distilled
    into their own folders, summarised across seeds."""
    results = json.loads((out / "results.json").read_text())
    grid_width = Image.open(out / "grid.png").width
    student = out / "rg-lcm" / "student" / "unet" / "diffusion_pytorch_model.safetensors"
    before = student.stat().st_mtime_ns
    quickstart()
    assert student.stat().st_mtime_ns == before
    card = (out / "rg-lcm" / "student" / "README.md").read_text()
    assert card.count("## Evaluation (`rglcd eval`)") == 1  # replaced, not appended again
    assert "| RG-LCM | 2 |" in card
    assert (
        json.loads((out / "results.json").read_text())["rows"][0]["ms_per_image"] == results["rows"][0]["ms_per_image"]
    )

    quickstart("--seeds", "2")
    assert student.stat().st_mtime_ns == before
    assert "seed: 1" in (out / "rg-lcm-seed1" / "config.yaml").read_text()
    assert "seed: 1" in (out / "lcm-seed1" / "config.yaml").read_text()
    results = json.loads((out / "results.json").read_text())
    models = list(dict.fromkeys(row["model"] for row in results["rows"]))
    assert models == ["teacher DDIM+CFG", "LCM seed 0", "RG-LCM seed 0", "LCM seed 1", "RG-LCM seed 1"]
    summary = results["across_seeds"]
    assert summary["seeds"] == [0, 1]
    rows = {(row["model"], row["steps"]): row for row in results["rows"]}
    rg_2 = next(s for s in summary["students"] if (s["model"], s["steps"]) == ("RG-LCM", 2))
    values = [rows["RG-LCM seed 0", 2]["world-clip"], rows["RG-LCM seed 1", 2]["world-clip"]]
    assert rg_2["world-clip"]["mean"] == pytest.approx(statistics.fmean(values))
    assert rg_2["world-clip"]["sd"] == pytest.approx(statistics.stdev(values)) and rg_2["fid"]["n"] == 2
    effect_2 = next(e for e in summary["rg_lcm_minus_lcm"] if e["steps"] == 2)
    differences = [rows[f"RG-LCM seed {s}", 2]["world-clip"] - rows[f"LCM seed {s}", 2]["world-clip"] for s in (0, 1)]
    assert effect_2["world-clip"]["mean"] == pytest.approx(statistics.fmean(differences), abs=1e-9)
    # Only same-seed pairs between students (and each student against the teacher) are compared.
    for record in results["paired_differences"]:
        assert record["second"] == "teacher DDIM+CFG" or record["first"][-1] == record["second"][-1]
    report = (out / "report.md").read_text()
    assert "**Across training seeds** (2: 0, 1)" in report and "**RG-LCM − LCM, seed by seed**" in report
    assert Image.open(out / "grid.png").width == grid_width  # the first seed's students only


def test_spread_and_contrast_effects_by_hand():
    assert spread([1.0, 2.0, 6.0]) == {"mean": 3.0, "sd": pytest.approx(2.6457513), "min": 1.0, "max": 6.0, "n": 3}
    assert spread([4.0])["sd"] is None
    family_of = {"LCM seed 0": "LCM", "RG-LCM seed 0": "RG-LCM", "LCM seed 1": "LCM", "RG-LCM seed 1": "RG-LCM"}
    rows = [
        {"model": "teacher", "steps": 50, "r": 9.0},
        {"model": "LCM seed 0", "steps": 2, "r": 1.0},
        {"model": "RG-LCM seed 0", "steps": 2, "r": 2.0},
        {"model": "LCM seed 1", "steps": 2, "r": 3.0},
        {"model": "RG-LCM seed 1", "steps": 2, "r": 5.0},
    ]
    spreads = family_spreads(rows, family_of, ["r"])
    assert [(s["model"], s["steps"], s["r"]["mean"], s["r"]["min"], s["r"]["max"]) for s in spreads] == [
        ("LCM", 2, 2.0, 1.0, 3.0), ("RG-LCM", 2, 3.5, 2.0, 5.0)
    ]  # fmt: skip
    paired = [  # as rglcd eval writes them: first − second in row order; one seed's RG-LCM comes first
        {"first": "LCM seed 0", "first_steps": 2, "second": "RG-LCM seed 0", "second_steps": 2,
         "r": {"mean": -1.0, "low": -1.5, "high": -0.5}},
        {"first": "RG-LCM seed 1", "first_steps": 2, "second": "LCM seed 1", "second_steps": 2,
         "r": {"mean": 2.0, "low": -0.5, "high": 4.0}},
        {"first": "LCM seed 0", "first_steps": 2, "second": "teacher", "second_steps": 50,
         "r": {"mean": -8.0, "low": -9.0, "high": -7.0}},
    ]  # fmt: skip
    (effect,) = contrast_effects(paired, family_of, ("RG-LCM", "LCM"), ["r"])
    assert effect["steps"] == 2 and effect["r"]["mean"] == 1.5 and effect["r"]["sd"] == pytest.approx(0.7071068)
    assert (effect["r"]["above_zero"], effect["r"]["below_zero"]) == (1, 0)  # seed 0: [0.5, 1.5]; seed 1 spans 0


def test_a_world_student_is_reused_continued_or_started_again(tmp_path, monkeypatch, epsilon_teacher_dir):
    """The world experiments' students: a finished one is reused; one stopped after a checkpoint continues from it;
    one stopped before its first checkpoint (a config.yaml and logs only) starts again in its folder, where
    `--resume latest` alone would refuse the run it cannot continue."""
    from rglcd.experiments import quickstart

    cache = tmp_path / "cache"  # what the world preset reads: a teacher folder and a data folder
    (cache / "world" / "data").mkdir(parents=True)
    (cache / "world" / "teacher").symlink_to(epsilon_teacher_dir)
    monkeypatch.setenv("RGLCD_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(quickstart, "train", lambda config, **options: calls.append((config, options)) or "trained")
    finished, resumable, early = tmp_path / "finished", tmp_path / "resumable", tmp_path / "early"
    (finished / "student").mkdir(parents=True)
    (finished / "student" / "model_index.json").write_text("{}")
    (resumable / "checkpoints" / "checkpoint-300").mkdir(parents=True)
    early.mkdir()
    (early / "config.yaml").write_text("seed: 0\n")
    assert quickstart.distil_world_student(finished, 600, 0, []) == finished / "student" and not calls
    assert quickstart.distil_world_student(resumable, 600, 1, ["reward.terms=[]"]) == "trained"
    assert quickstart.distil_world_student(early, 600, 0, []) == "trained"
    assert [options for _, options in calls] == [{"resume": "latest"}, {"overwrite": True}]
    config = calls[0][0]
    assert (config.logging.output_dir, config.optim.max_train_steps, config.seed, config.reward.terms) == (
        str(resumable), 600, 1, [],
    )  # fmt: skip
