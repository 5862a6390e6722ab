"""`rglcd world overoptimisation`'s three students and report.

The experiment runs end to end in one place, the README's commands (``tests/test_cli.py::
test_readme_rglcd_commands_run``, a fresh cache of the shipped world weights), which calls this check on the folder
the README's ``rglcd world overoptimisation`` wrote."""

import json
from pathlib import Path

CI_SIZE = ["--train-steps", "2", "--prompts", "8", "--lrm-samples", "128", "--lrm-steps", "2"]  # added by the test


def check_the_report(out: Path, cache: Path) -> None:
    """What ``rglcd world overoptimisation`` (at ``CI_SIZE``, cache ``cache``) leaves in ``out``."""
    results = json.loads((out / "results.json").read_text())
    assert [(row["model"], row["steps"]) for row in results["rows"]] == [("teacher DDIM+CFG", 50)] + [
        (model, steps) for model in ("LCM", "direct", "latent proxy") for steps in (1, 2, 4)
    ]
    for row in results["rows"]:
        assert 0 <= row["high_frequency"] <= 1 and 0 <= row["judge_accuracy"] <= 1 and row["fid"] >= 0
    assert results["rows"][0]["hf_ratio"] == 1.0
    assert (cache / "world" / "lrm" / "model.safetensors").is_file()  # pretrained once, cached
    latent_config = (out / "latent-proxy" / "config.yaml").read_text()
    assert "mode: latent" in latent_config and "world-aesthetic" in latent_config
    assert (out / "latent-proxy" / "latent_rm" / "model.safetensors").is_file()
    assert "mode: direct" in (out / "direct" / "config.yaml").read_text()
    report = (out / "report.md").read_text()
    columns = "world-aesthetic | colorfulness | judge_accuracy | judge_exact | high_frequency | fid | hf_ratio"
    assert f"| model | steps | {columns} |" in report
    assert (out / "grid.png").stat().st_size > 0
