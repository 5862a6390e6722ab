"""`rglcd quickstart` on a cache of tiny world assets: the report files, and reuse on a second run."""

import json
import os
import subprocess
import sys


def quickstart(cache, out):
    env = {**os.environ, "RGLCD_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-m", "rglcd", "quickstart", "--out", str(out), "--train-steps", "2", "--prompts", "8"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quickstart_writes_the_report_and_reuses_its_work(tiny_world_cache, tmp_path):
    out = tmp_path / "quickstart"
    quickstart(tiny_world_cache, out)
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
    assert (out / "grid.png").stat().st_size > 0
    card = (out / "rg-lcm" / "student" / "README.md").read_text()  # rglcd eval adds its table to the model card
    assert "## Evaluation (`rglcd eval`)" in card and "| RG-LCM | 2 |" in card and "| LCM | 2 |" not in card
    assert "world-clip (β 0.5)" in card
    rg_config = (out / "rg-lcm" / "config.yaml").read_text()
    assert "world-clip" in rg_config and "name: world-clip" not in (out / "lcm" / "config.yaml").read_text()

    student = out / "rg-lcm" / "student" / "unet" / "diffusion_pytorch_model.safetensors"
    before = student.stat().st_mtime_ns
    quickstart(tiny_world_cache, out)  # the second run distils nothing and generates nothing again
    assert student.stat().st_mtime_ns == before
    card = (out / "rg-lcm" / "student" / "README.md").read_text()
    assert card.count("## Evaluation (`rglcd eval`)") == 1  # replaced, not appended again
    assert (
        json.loads((out / "results.json").read_text())["rows"][0]["ms_per_image"] == results["rows"][0]["ms_per_image"]
    )
