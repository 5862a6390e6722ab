"""`rglcd world one-step` on a cache of tiny world assets: eight students, the paired table against RG-LCM, and the
best two over a second training seed."""

import json
import os

import yaml

from rglcd.config import load_config
from rglcd.experiments.one_step import OneStepSettings, student_runs

from .test_cli import rglcd

STUDENTS = [
    "LCM", "RG-LCM", "RG-LCM-K1", "DMD", "LCD+DMD", "LCD+DMD+GAN", "LCD+DMD+GAN+reward", "LCD+DMD0.3+reward-K1",
]  # fmt: skip


def test_one_step_trains_every_combination_and_reports(tiny_world_cache, tmp_path):
    out = tmp_path / "one-step"
    rglcd("world", "one-step", "--out", out, "--train-steps", "2", "--prompts", "4", "--seeds", "2",
          "--dmd", "dmd.weight=1", "dmd.fake_updates=2", "--gan", "gan.weight=0.1",
          env={**os.environ, "RGLCD_CACHE": str(tiny_world_cache)})  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [(row["model"], row["steps"]) for row in results["rows"]] == [("teacher DDIM+CFG", 50)] + [
        (model, steps) for model in STUDENTS for steps in (1, 2, 4)
    ]
    assert list(results["training_seconds_per_step"]) == STUDENTS
    configs = {
        name: yaml.safe_load((out / name / "config.yaml").read_text())
        for name in ("dmd", "lcd-dmd-gan-reward", "rg-lcm-k1", "lcd-dmd0.3-reward-k1")
    }
    dmd = configs["dmd"]
    assert (dmd["distill"]["lcd_weight"], dmd["dmd"]["weight"], dmd["dmd"]["fake_updates"], dmd["gan"]["weight"]) == (
        0.0, 1.0, 2, 0.0,
    )  # fmt: skip
    full = configs["lcd-dmd-gan-reward"]
    assert full["gan"]["weight"] == 0.1 and full["reward"]["terms"][0]["name"] == "world-clip"
    assert full["distill"]["lcd_weight"] == 1.0 and full["reward"]["target"] == "prediction"
    for name, dmd_weight in (("rg-lcm-k1", 0.0), ("lcd-dmd0.3-reward-k1", 0.3)):  # the reward on the 1-step sample
        reward = configs[name]["reward"]
        assert (reward["target"], reward["sample_steps"], reward["terms"][0]["name"]) == ("sample", 1, "world-clip")
        assert configs[name]["dmd"]["weight"] == dmd_weight and configs[name]["distill"]["lcd_weight"] == 1.0
    report = (out / "report.md").read_text()
    assert "| LCD+DMD+GAN | 1 |" in report and "relative to RG-LCM" in report
    assert "| DMD − RG-LCM | 1 | " in report
    against = results["against_rg_lcm"]
    assert len(against) == 7 * 3 and all(d["second"] == "RG-LCM" for d in against)
    assert all(d["judge_exact"]["low"] <= d["judge_exact"]["mean"] <= d["judge_exact"]["high"] for d in against)
    seeds = json.loads((out / "seeds" / "results.json").read_text())
    families = {row["model"].rpartition(" seed ")[0] for row in seeds["rows"] if row["kind"] == "lcm"}
    assert len(families) == 3 and "RG-LCM" in families and families <= set(STUDENTS)
    assert (out / "rg-lcm-seed1" / "student" / "model_index.json").is_file()
    assert (out / "grid.png").stat().st_size > 0


def test_the_world_one_step_preset_is_the_experiments_recipe_student(tmp_path, epsilon_teacher_dir):
    common = ["logging.output_dir=runs/x", f"model.teacher={epsilon_teacher_dir}", f"data.source={tmp_path}"]
    recipe = student_runs(OneStepSettings())["LCD+DMD0.3+reward-K1"]
    assert load_config("world", [*common, *recipe]).to_dict() == load_config("world-one-step", common).to_dict()
