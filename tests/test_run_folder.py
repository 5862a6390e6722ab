"""A run folder is a unit: the disaster matrix of (what the folder holds) × (what the user does), byte for byte.

States: empty (no folder), started (a run killed after its checkpoint-2: config, checkpoint, logs, no export),
finished (a run that wrote no checkpoint: checkpoints every 50 steps, 2 steps run), foreign (started, with the
user's own files beside and inside its folders). Actions: a new run, --overwrite with a bad teacher, --resume latest,
--overwrite that works, and kill -9 in the middle of a step (on an event: the process says it is in the step).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rglcd.experiments.demo import tiny_setup

from .test_cli import run_main

HERE = Path(__file__).parent
STATES = ("empty", "started", "finished", "foreign")
FOREIGN = {"notes.txt": "mine", "checkpoints/my-readme.txt": "mine", "checkpoints/checkpoint-best/weights.txt": "mine"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=16)


def settings(tiny, out, steps=4, teacher=None, checkpointing=2):
    return [
        f"model.teacher={teacher or tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
        "optim.batch_size=2", f"optim.max_train_steps={steps}", f"logging.checkpointing_steps={checkpointing}",
        "logging.validation_steps=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def templates(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    run_main("train", "tiny", *settings(tiny, root / "finished", steps=2, checkpointing=50))
    run_main("train", "tiny", *settings(tiny, root / "started", steps=2))
    for name in ("student", "target_unet", "train_summary.json"):  # what a kill before the export leaves
        path = root / "started" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


def make(state: str, templates: Path, out: Path) -> Path:
    if state != "empty":
        shutil.copytree(templates / ("finished" if state == "finished" else "started"), out)
    if state == "foreign":
        for name, text in FOREIGN.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder, by path."""
    if not folder.exists():
        return {}
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        found[relative] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr + result.stdout
    return result.stderr


@pytest.mark.parametrize("state", STATES)
def test_a_new_run_never_replaces_a_run(state, tiny, templates, tmp_path):
    out = make(state, templates, tmp_path / "run")
    before = snapshot(out)
    result = run_main("train", "tiny", *settings(tiny, out), check=False)
    if state == "empty":
        assert result.returncode == 0 and (out / "student" / "model_index.json").is_file()
        return
    assert "holds a run" in one_line_error(result) and "--overwrite" in result.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("state", STATES)
def test_overwrite_with_a_bad_teacher_changes_nothing(state, tiny, templates, tmp_path):
    out = make(state, templates, tmp_path / "run")
    before = snapshot(out)
    bad = shutil.copytree(tiny / "teacher", tmp_path / "no-unet", ignore=shutil.ignore_patterns("unet"))
    result = run_main("train", "tiny", *settings(tiny, out, teacher=bad), "--overwrite", check=False)
    assert "'unet'" in one_line_error(result) and str(bad) in result.stderr
    assert snapshot(out) == before  # a fresh folder is not even created


@pytest.mark.parametrize("state", STATES)
def test_resume_latest(state, tiny, templates, tmp_path):
    out = make(state, templates, tmp_path / "run")
    before = snapshot(out)
    result = run_main("train", "tiny", *settings(tiny, out), "--resume", "latest", check=False)
    if state == "finished":  # nothing to resume: refused, not silently started over
        assert "no checkpoint to resume" in one_line_error(result)
        assert snapshot(out) == before
        return
    assert result.returncode == 0, result.stderr
    assert ("starting a new run" in result.stdout) == (state == "empty")
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
    if state != "empty":  # the checkpoint it resumed from is left as it was, and the user's files
        checkpoint = {k: v for k, v in before.items() if k.startswith("checkpoints/checkpoint-2")}
        assert {k: v for k, v in snapshot(out).items() if k in checkpoint} == checkpoint
        assert all((out / name).read_text() == text for name, text in FOREIGN.items() if state == "foreign")


@pytest.mark.parametrize("state", ["finished", "foreign"])
def test_overwrite_replaces_only_what_rglcd_wrote(state, tiny, templates, tmp_path):
    out = make(state, templates, tmp_path / "run")
    old_config = (out / "config.yaml").read_text()
    run_main("train", "tiny", *settings(tiny, out), "optim.learning_rate=5e-5", "--overwrite")
    assert (out / "config.yaml").read_text() != old_config and "5.0e-05" in (out / "config.yaml").read_text()
    assert sorted(path.name for path in (out / "checkpoints").glob("checkpoint-[0-9]*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    for name, text in FOREIGN.items() if state == "foreign" else ():
        assert (out / name).read_text() == text


def stall(marker: Path, at_forward: int, *args) -> None:
    """Run ``rglcd train tiny ARGS`` until it is inside its ``at_forward``-th step, then kill -9 it."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "stall_at_step.py"), str(marker), str(at_forward), "train", "tiny", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a bound for a broken run, not the event waited for
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run never reached its step"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("state", STATES[1:])  # an empty folder: test_resume.py kills a new run after checkpoint-2
def test_kill_mid_step(state, tiny, templates, tmp_path):
    """Killed before its first step has run, a run leaves the folder as it found it."""
    out = make(state, templates, tmp_path / "run")
    before = snapshot(out)
    flag = "--overwrite" if state == "finished" else "--resume"
    stall(tmp_path / "in-step", 1, *settings(tiny, out), *([flag, "latest"] if flag == "--resume" else [flag]))
    assert snapshot(out) == before


def test_resume_takes_a_path_given_relative_as_the_same_setting(tiny, templates, tmp_path, monkeypatch):
    """The started run named its teacher and data by absolute paths; the same folders given relative to the working
    directory are no change of a fixed setting."""
    out = make("started", templates, tmp_path / "run")
    monkeypatch.chdir(tiny)
    relative = [
        arg.replace(f"{tiny}/", "") if arg.startswith(("model.", "data.")) else arg for arg in settings(tiny, out)
    ]
    assert "model.teacher=teacher" in relative and "data.source=data" in relative
    result = run_main("train", "tiny", *relative, "--resume", "latest", check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
