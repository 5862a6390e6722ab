"""`rglcd world sampler-reward` on a cache of tiny world assets: the students of both reward targets, both reports."""

import json
import os

import yaml

from .test_cli import rglcd


def test_sampler_reward_trains_both_targets_and_reports(tiny_world_cache, tmp_path):
    out = tmp_path / "sampler-reward"
    rglcd("world", "sampler-reward", "--out", out, "--train-steps", "2", "--prompts", "4", "--sample-steps", "2",
          "--etas", "0,1", env={**os.environ, "RGLCD_CACHE": str(tiny_world_cache)})  # fmt: skip
    students = ["LCM", "clip prediction", "clip sample K2", "aesthetic prediction", "aesthetic sample K2"]
    results = json.loads((out / "results.json").read_text())
    assert [(row["model"], row["steps"]) for row in results["rows"]] == [("teacher DDIM+CFG", 50)] + [
        (model, steps) for model in students for steps in (1, 2, 4)
    ]
    assert list(results["training_seconds_per_step"]) == students
    reward = yaml.safe_load((out / "clip-sample-k2" / "config.yaml").read_text())["reward"]
    assert (reward["target"], reward["sample_steps"], reward["grad_steps"]) == ("sample", 2, 1)
    assert reward["terms"][0]["name"] == "world-clip"
    aesthetic = yaml.safe_load((out / "aesthetic-sample-k2" / "config.yaml").read_text())["reward"]
    assert aesthetic["target"] == "sample" and aesthetic["terms"][0]["name"] == "world-aesthetic"
    assert yaml.safe_load((out / "clip-prediction" / "config.yaml").read_text())["reward"]["target"] == "prediction"
    report = (out / "report.md").read_text()
    assert "| clip sample K2 | 2 |" in report and "ms per training step" in report
    assert "| clip sample K2 − clip prediction | 2 | world-clip " in report
    assert "| aesthetic sample K2 − aesthetic prediction | 4 | world-aesthetic " in report
    focused = results["focused_differences"]
    assert {(d["first"], d["second"], d["first_steps"]) for d in focused} >= {("clip prediction", "LCM", 1)}
    assert len(focused) == 3 * 3 and all(d["first_steps"] == d["second_steps"] for d in focused)
    for difference in focused:
        for measure in (difference[difference["reward"]], difference["judge_accuracy"]):
            assert measure["low"] <= measure["mean"] <= measure["high"] and measure["count"] == 4
    assert "**Paired differences**" in report  # rglcd eval's own: every pair at equal steps, and each vs the teacher
    assert len(results["paired_differences"]) == 3 * 10 + 15
    tcd = json.loads((out / "tcd" / "results.json").read_text())
    tcd_models = dict.fromkeys(row["model"] for row in tcd["rows"] if row["kind"] == "lcm")
    assert list(tcd_models) == [
        f"{student} ({sampler})" for student in students[:3] for sampler in ("lcm", "tcd eta=0", "tcd eta=1")
    ]
    assert (out / "grid.png").stat().st_size > 0 and (out / "tcd" / "grid.png").stat().st_size > 0
