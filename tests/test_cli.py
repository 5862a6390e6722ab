"""Smoke tests of every CLI command, run as a user runs them (a subprocess), checking the files written; checks of
one command's options and errors run its entry point in this process (``run_main``), which skips the interpreter's
start-up."""

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

from . import test_overoptimisation, test_quickstart

ROOT = Path(__file__).resolve().parents[1]


def rglcd(*args, cwd=None, check=True, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "rglcd", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"rglcd {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def run_main(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``rglcd.cli.main`` in this process, as a finished ``rglcd ARGS``: its exit code, stdout and stderr (a failure
    is an AssertionError with them, unless ``check`` is False)."""
    from rglcd.cli import main

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(arg) for arg in args])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    if check and code:
        raise AssertionError(f"rglcd {' '.join(map(str, args))} failed:\n{stdout.getvalue()}\n{stderr.getvalue()}")
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rglcd("demo", "--out", out, "--steps", "3", "--prediction-type", "v_prediction")
    return out


def test_demo_writes_teacher_data_run_and_samples(demo_run):
    assert (demo_run / "teacher" / "model_index.json").is_file()
    assert sorted(p.name for p in (demo_run / "data").glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]
    run = demo_run / "rglcd"
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 3
    assert "max_train_steps: 3" in (run / "config.yaml").read_text()
    for steps in (1, 2, 4):
        assert (run / f"samples-{steps}-steps.png").stat().st_size > 0
    pipeline = DiffusionPipeline.from_pretrained(run / "student")
    assert type(pipeline.scheduler).__name__ == "LCMScheduler"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_sample_is_deterministic_for_a_seed(demo_run, tmp_path):
    args = [
        "sample",
        "--model",
        demo_run / "rglcd" / "student",
        "--prompt",
        "a red picture",
        "--prompt",
        "a blue picture",
    ]
    run_main(*args, "--steps", "2", "--seed", "5", "--out", tmp_path / "a")
    run_main(*args, "--steps", "2", "--seed", "5", "--out", tmp_path / "b")
    run_main(*args, "--steps", "2", "--seed", "6", "--out", tmp_path / "c")
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["steps"] == 2 and [image["file"] for image in meta["images"]] == ["000-00.png", "001-00.png"]
    assert meta["guidance"] == 8.5  # diffusers' LatentConsistencyModelPipeline default, recorded as used
    for name in ("000-00.png", "001-00.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "000-00.png").read_bytes() != (tmp_path / "c" / "000-00.png").read_bytes()


def test_sample_in_batches_and_channels_last_gives_the_same_images(demo_run, tmp_path):
    import numpy as np
    from PIL import Image

    student = demo_run / "rglcd" / "student"
    args = ["sample", "--model", student, "--prompt", "a red picture", "--prompt", "a blue picture", "--steps", "2"]
    run_main(*args, "--num-images", "2", "--batch-size", "1", "--out", tmp_path / "one")
    run_main(*args, "--num-images", "2", "--batch-size", "3", "--channels-last", "--out", tmp_path / "three")
    meta = json.loads((tmp_path / "three" / "samples.json").read_text())
    assert [(image["file"], image["seed"]) for image in meta["images"]] == [
        ("000-00.png", 0), ("000-01.png", 1), ("001-00.png", 2), ("001-01.png", 3)
    ]  # fmt: skip
    for image in meta["images"]:
        one, three = (np.asarray(Image.open(tmp_path / run / image["file"]), dtype=int) for run in ("one", "three"))
        assert np.abs(one - three).max() <= 1  # float rounding of other batch shapes and memory layouts at most
    assert not np.array_equal(*(np.asarray(Image.open(tmp_path / "one" / f"000-0{i}.png")) for i in (0, 1)))


def test_sample_with_tcd_and_its_gamma(demo_run, tmp_path):
    args = ["sample", "--model", demo_run / "rglcd" / "student", "--prompt", "a red picture", "--steps", "4"]
    run_main(*args, "--out", tmp_path / "lcm")
    run_main(*args, "--scheduler", "tcd", "--out", tmp_path / "tcd")
    run_main(*args, "--scheduler", "tcd", "--eta", "0", "--out", tmp_path / "tcd0")
    meta = json.loads((tmp_path / "tcd" / "samples.json").read_text())
    assert (meta["scheduler"], meta["eta"]) == ("tcd", 0.3)  # TCD's default γ
    assert json.loads((tmp_path / "tcd0" / "samples.json").read_text())["eta"] == 0.0
    assert json.loads((tmp_path / "lcm" / "samples.json").read_text())["scheduler"] == "lcm"
    images = {run: (tmp_path / run / "000-00.png").read_bytes() for run in ("lcm", "tcd", "tcd0")}
    assert len(set(images.values())) == 3
    result = run_main(*args, "--eta", "0.5", "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "--eta is TCD's gamma: use it with --scheduler tcd" in result.stderr
    result = run_main(*args, "--scheduler", "tcd", "--eta", "1.5", "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "must be in [0, 1]" in result.stderr


def test_sample_errors_are_clear(demo_run, tmp_path):
    result = run_main("sample", "--model", demo_run / "teacher", "--prompt", "x", "--out", tmp_path, check=False)
    assert result.returncode == 2 and "no guidance embedding" in result.stderr
    result = run_main("sample", "--model", tmp_path / "missing", "--prompt", "x", "--out", tmp_path, check=False)
    assert result.returncode == 2 and "could not read the pipeline index" in result.stderr
    result = run_main("sample", "--model", demo_run / "rglcd" / "student", "--out", tmp_path, check=False)
    assert result.returncode != 0 and "at least one --prompt" in result.stderr
    student = demo_run / "rglcd" / "student"
    result = run_main("sample", "--model", student, "--prompt", "x", "--steps", "9", "--out", tmp_path, check=False)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_sample_in_bf16_records_its_dtype(demo_run, tmp_path):
    import numpy as np
    from PIL import Image

    args = ["sample", "--model", demo_run / "rglcd" / "student", "--prompt", "a red picture", "--steps", "2"]
    run_main(*args, "--dtype", "bf16", "--num-images", "2", "--out", tmp_path / "bf16")
    run_main(*args, "--num-images", "2", "--out", tmp_path / "default")
    assert json.loads((tmp_path / "bf16" / "samples.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "default" / "samples.json").read_text())["dtype"] == "float32"  # the CPU's default
    for name in ("000-00.png", "000-01.png"):
        low, full = (np.asarray(Image.open(tmp_path / run / name), dtype=int) for run in ("bf16", "default"))
        assert low.shape == (32, 32, 3) and np.abs(low - full).mean() < 8 and not np.array_equal(low, full)


@pytest.mark.parametrize("command", [["sample", "--model", "M", "--out", "O"], ["eval", "--model", "M"], ["serve"]])
def test_dtype_choices_and_default(command):
    from rglcd.cli import DTYPES, build_parser
    from rglcd.models.speed import SAMPLING_DTYPES

    assert DTYPES == tuple(SAMPLING_DTYPES)
    parser = build_parser()
    assert parser.parse_args(command).dtype is None  # resolved with the device: bf16 on a GPU, fp32 on the CPU
    assert parser.parse_args([*command, "--dtype", "fp16"]).dtype == "fp16"
    errors = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(errors):
        parser.parse_args([*command, "--dtype", "float16"])
    assert stop.value.code == 2 and "argument --dtype: invalid choice: 'float16'" in errors.getvalue()


def test_the_help_gives_the_sampling_defaults_and_imports_no_diffusers():
    """The guidance options name rglcd.sampling's defaults as figures and leave them unset (the commands take them
    from there), so that building the parser, and --help, imports no diffusers."""
    from rglcd.cli import build_parser
    from rglcd.sampling import LCM_GUIDANCE, TEACHER_GUIDANCE
    from rglcd.world.plugin import WORLD_LCM_GUIDANCE

    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]

    def option(command: str, flag: str) -> argparse.Action:
        (action,) = [action for action in commands.choices[command]._actions if flag in action.option_strings]
        assert action.default is None, (command, flag)
        return action

    assert f"(default: {LCM_GUIDANCE})" in option("sample", "--guidance").help
    assert f"(default: {WORLD_LCM_GUIDANCE} world, else {LCM_GUIDANCE})" in option("eval", "--guidance").help
    assert f"(default: {TEACHER_GUIDANCE})" in option("eval", "--teacher-guidance").help
    assert f"default: {LCM_GUIDANCE}, the miniature's {WORLD_LCM_GUIDANCE}" in option("serve", "--guidance").help
    code = "import sys; from rglcd.cli import build_parser; build_parser(); print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"


def test_a_device_that_is_not_here_is_a_one_line_error(demo_run, tmp_path, monkeypatch):
    import torch

    from rglcd.models.speed import pick_device

    student = demo_run / "rglcd" / "student"
    if not torch.cuda.is_available():
        result = run_main("sample", "--model", student, "--prompt", "x", "--device", "cuda", "--out", tmp_path,
                          check=False)  # fmt: skip
        assert result.returncode == 2
        assert result.stderr == "rglcd sample: --device cuda: torch sees no CUDA GPU here; use cpu (or auto)\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"cuda:2: torch sees 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:2")
    with pytest.raises(ValueError, match="gpu: not a device; use auto, cpu, cuda or cuda:N"):
        pick_device("gpu")


README = ROOT / "README.md"
DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def doc_lines(page: Path, section: str | None = None) -> list[str]:
    """The shell lines of a Markdown page's fenced bash blocks (all of them, or those under a '## section' heading):
    comments dropped, backslash continuations joined into one line."""
    text = page.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending = ""
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
            elif pending or line:
                lines.append((pending + line).strip())
                pending = ""
    return lines


def doc_commands(page: Path, *sections: str) -> list[str]:
    """The commands of ``doc_lines`` (of the whole page, or of ``sections`` in order), split on ``&&``."""
    lines = [line for section in sections for line in doc_lines(page, section)] if sections else doc_lines(page)
    return [part.strip() for line in lines for part in line.split("&&")]


def rglcd_arguments(command: str) -> list[str] | None:
    """The arguments of ``rglcd ...`` or of a launcher's ``... -m rglcd ...``; None for any other command."""
    words = shlex.split(command)
    if words[:1] == ["rglcd"]:
        return words[1:]
    starts = [i + 2 for i in range(len(words) - 1) if words[i : i + 2] == ["-m", "rglcd"]]
    return words[starts[0] :] if starts else None


def test_documented_commands_parse():
    """Every rglcd command in a bash block of the README or a docs page parses with today's command line."""
    import contextlib
    import io

    from rglcd.cli import build_parser

    parser = build_parser()
    checked = []
    for page in DOC_PAGES:
        for command in doc_commands(page):
            args = rglcd_arguments(command)
            if args is None:
                continue
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    parser.parse_args(args)
            except SystemExit as error:
                if error.code:
                    pytest.fail(f"{page.relative_to(ROOT)}: `{command}` does not parse:\n{errors.getvalue()}")
            checked.append(command)
    assert len(checked) >= 20, checked


# What the README test adds to its long commands to run them at a CI size; their full sizes are measured by hand
# (README, docs) and not run in CI.
CI_SIZES = {
    ("quickstart",): test_quickstart.CI_SIZE,
    ("world", "overoptimisation"): test_overoptimisation.CI_SIZE,
    ("demo",): ["--steps", "3"],
    ("eval",): ["--prompts", "world:8"],  # the last --prompts wins
}


def test_readme_rglcd_commands_run(tmp_path):
    """Every rglcd command of the README's set-up and quick start runs, in order, as a user runs it (a new process),
    in a scratch folder and cache filled from the shipped world weights, with ``CI_SIZES`` added.

    This is the one place the quickstart and the over-optimisation experiment run end to end: their reports are
    checked here (the checks live in test_quickstart.py and test_overoptimisation.py), then the quickstart runs
    twice more on its folder (reuse; a second training seed).
    """
    commands = [command for command in doc_commands(README, "Set-up", "Quick start") if command.startswith("rglcd ")]
    assert commands[0] == "rglcd quickstart" and len(commands) >= 3
    cache = tmp_path / "cache"
    env = {**os.environ, "RGLCD_CACHE": str(cache)}
    checked = set()
    for command in commands:
        args = shlex.split(command)[1:]
        args += next((extra for prefix, extra in CI_SIZES.items() if tuple(args[: len(prefix)]) == prefix), [])
        rglcd(*args, cwd=tmp_path, env=env)
        if args[0] == "quickstart":
            test_quickstart.check_the_report(tmp_path / "runs" / "quickstart")
            checked.add("quickstart")
        if args[:2] == ["world", "overoptimisation"]:
            test_overoptimisation.check_the_report(tmp_path / "runs" / "overoptimisation", cache)
            checked.add("overoptimisation")
    assert checked == {"quickstart", "overoptimisation"}  # both experiments are in the README's commands
    assert (cache / "world" / "teacher" / "model_index.json").is_file()
    quickstart = test_quickstart.CI_SIZE
    test_quickstart.check_reuse_and_seeds(
        tmp_path / "runs" / "quickstart", lambda *extra: rglcd("quickstart", *quickstart, *extra, cwd=tmp_path, env=env)
    )


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    test_lines = [line for line in doc_lines(README, "Set-up") if "pytest" in line]
    assert len(test_lines) == 1 and test_lines[0].startswith("pip install")
    assert test_lines[0] in ci, f".ci/run does not run the README's `{test_lines[0]}` verbatim"
