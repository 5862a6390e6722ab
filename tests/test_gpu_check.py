"""The CPU rehearsal of the prepared GPU check (benchmarks/gpu_check.py): the same command, sections and files as
on the GPU, with tiny architectures, so that the check cannot rot between the rare GPU windows."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
RUNS = ("sd15-512-lora", "sd21-768-lora", "sd15-512", "sdxl-1024-lora")
# Written out here, not read from the script: a section that goes missing there must fail this test.
SECTIONS = [
    "environment",
    "data",
    "teacher SD15",
    "teacher SD21",
    "teacher SDXL",
    *(name for run in RUNS for name in (f"plan {run}", f"train {run} plain")),
    "sampling",
    "rglcd sample",
    "rglcd eval",
    *(f"train {run} compiled" for run in RUNS),
]
# What each kind of section must measure (more may follow).
FIGURES = {
    "plan": {"batch_size", "planned_bytes", "flops_per_step", "planned_seconds_per_step"},
    "train": {
        *("median_step_seconds", "first_step_seconds", "first_minus_median_seconds", "peak_bytes", "planned_bytes"),
        *("measured_over_planned_bytes", "measured_over_planned_seconds", "utilization"),
    },
    "sampling": {
        *(f"student_{steps}_steps_images_per_second" for steps in (1, 2, 4)),
        "teacher_steps",
        "teacher_ddim_cfg_images_per_second",
    },
    "rglcd eval": {"images_per_second", "generation_images_per_second", "hpsv2.1"},
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """``python benchmarks/gpu_check.py --device cpu --tiny --out DIR`` as documented (about a minute here)."""
    out = tmp_path_factory.mktemp("gpu-check")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPOSITORY / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    finished = subprocess.run(
        [*command, "--budget", "1200", "--out", str(out)], capture_output=True, text=True, env=environment
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def numbers(value):
    """Every number in a JSON value."""
    if isinstance(value, dict):
        return [number for item in value.values() for number in numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in numbers(item)]
    return [value] if isinstance(value, int | float) else []


def test_every_section_is_reported_with_finite_figures_or_one_line(rehearsal):
    results, report = rehearsal
    assert [section["name"] for section in results["sections"]] == SECTIONS
    for section in results["sections"]:
        name, status = section["name"], section["status"]
        assert f"| {name} | {status} |" in report, name
        if status == "ok":
            assert all(math.isfinite(number) for number in numbers(section["figures"])), section
            kind = name if name in FIGURES else name.split(" ")[0]
            assert FIGURES.get(kind, set()) <= set(section["figures"]), (name, section["figures"])
        else:
            assert status == "error", section  # a large budget: nothing is skipped
            assert section["error"] and "\n" not in section["error"], section
            assert section["error"] in report


def test_the_rehearsal_runs_every_section(rehearsal):
    results, report = rehearsal
    failed = {section["name"]: section.get("error") for section in results["sections"] if section["status"] != "ok"}
    assert not failed
    for run in RUNS:
        for variant in ("plain", "compiled"):
            assert f"| {run} | {variant} |" in report  # the training table's row
    assert "| student, 4 steps |" in report and "`rglcd eval`" in report
    assert not re.search(r"\b(nan|inf)\b", report, re.IGNORECASE)
