"""`rglcd world overoptimisation` on a cache of tiny world assets: the three students and the report."""

import json
import os
import subprocess
import sys


def test_overoptimisation_trains_three_students_and_reports(tiny_world_cache, tmp_path):
    out = tmp_path / "overopt"
    result = subprocess.run(
        [sys.executable, "-m", "rglcd", "world", "overoptimisation", "--out", str(out), "--train-steps", "2",
         "--prompts", "8", "--lrm-samples", "128", "--lrm-steps", "2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "RGLCD_CACHE": str(tiny_world_cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(row["model"], row["steps"]) for row in results["rows"]] == [("teacher DDIM+CFG", 50)] + [
        (model, steps) for model in ("LCM", "direct", "latent proxy") for steps in (1, 2, 4)
    ]
    for row in results["rows"]:
        assert 0 <= row["high_frequency"] <= 1 and 0 <= row["judge_accuracy"] <= 1 and row["fid"] >= 0
    assert results["rows"][0]["hf_ratio"] == 1.0
    assert (tiny_world_cache / "world" / "lrm" / "model.safetensors").is_file()  # pretrained once, cached
    latent_config = (out / "latent-proxy" / "config.yaml").read_text()
    assert "mode: latent" in latent_config and "world-aesthetic" in latent_config
    assert (out / "latent-proxy" / "latent_rm" / "model.safetensors").is_file()
    assert "mode: direct" in (out / "direct" / "config.yaml").read_text()
    report = (out / "report.md").read_text()
    columns = "world-aesthetic | colorfulness | judge_accuracy | judge_exact | high_frequency | fid | hf_ratio"
    assert f"| model | steps | {columns} |" in report
    assert (out / "grid.png").stat().st_size > 0
