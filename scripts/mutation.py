"""Mutation testing of one rglcd module with mutmut 3: do its tests notice when its code changes? Not part of the
test suite (a module takes minutes, step.py about an hour on two cores). Scores and survivors: docs/testing.md.

    pip install -e ".[test,mutation]"
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/mutation.py MODULE [--show] [--retry] [--workdir DIR]

MODULE is one of MODULES below (schedules, losses, step, checkpoints, config, stats, serve, plan). The working tree
is never mutated: src/ and tests/ are copied to a fresh scratch folder (``/tmp/rglcd-mutation/MODULE``) with the
repository's pyproject.toml plus a ``[tool.mutmut]`` table that mutates the one module and runs only its tests, and
``mutmut run --max-children 1`` runs there (its ``mutants/`` folder too). It prints the killed / survived / timeout
/ suspicious / no-tests counts, the score killed / total and each mutant not killed (``--show``: with its diff).

Notes: for config.py, serve.py and plan.py only the functions listed in MODULES are mutated. mutmut 3 skips
decorated functions, so in the copy a one-line decorator is applied after the function instead (``undecorated``).
Tests that run ``python -m rglcd`` in a subprocess import the mutated copy (PYTHONPATH), but mutmut only links a
function to the tests that call it in-process: a function reached only through a subprocess counts as "no tests".
``--retry`` reruns, with the current tests, only the mutants the last run in the folder did not kill.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> (its file, the tests that check it, the functions mutated: None for all; "Class.method" for a method)
MODULES: dict[str, tuple[str, list[str], list[str] | None]] = {
    "schedules": ("src/rglcd/schedules.py", ["tests/test_schedules.py"], None),
    "losses": ("src/rglcd/losses.py", ["tests/test_losses.py"], None),
    "step": ("src/rglcd/step.py", ["tests/test_step.py"], None),
    "checkpoints": (
        "src/rglcd/train/checkpoints.py",
        [
            "tests/test_checkpoints.py",
            "tests/test_train.py::test_a_sharded_checkpoint_folder_is_checked_before_torch_unpickles_it",
        ],
        None,
    ),
    "stats": ("src/rglcd/stats.py", ["tests/test_stats_exact.py", "tests/test_evaluate.py"], None),
    # config.py (~560 lines): its validation only.
    "config": (
        "src/rglcd/config.py",
        ["tests/test_config_rules.py", "tests/test_config.py"],
        [
            "resolution_problem",
            "validate",
            "_check_model_and_lora",
            "_check_data_and_distill",
            "_check_reward",
            "_check_matching",
            "_check_optim_and_logging",
        ],
    ),
    # serve.py: the request checks (not the model loading or the gradio page); the browser test is not run.
    "serve": (
        "src/rglcd/serve.py",
        ["tests/test_serve_api.py", "tests/test_serve.py", "-k", "not browser"],
        ["_is_number", "_shown", "_whole", "_scale", "check_request"],
    ),
    # plan.py (~790 lines): its arithmetic (not the tracer or the meta-device build).
    "plan": (
        "src/rglcd/plan.py",
        ["tests/test_plan.py"],
        ["Plan.total", "_bytes", "_adam_8bit_bytes", "fit_switches", "size", "seconds_per_step", "parse_memory"],
    ),
}
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}  # fmt: skip
KILLED = ("killed", "timeout")


def read_codes(meta: Path, patterns: list[str]) -> dict[str, int | None]:
    """mutmut's exit code of each mutant (its verdict, STATUS) that ``patterns`` name."""
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: code for name, code in codes.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}


def mutant_patterns(path: str, functions: list[str] | None) -> list[str]:
    """mutmut's names of the mutants of ``functions`` in ``path`` (rglcd.step.xǁStepNoiseǁdraw__mutmut_3)."""
    module = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
    if functions is None:
        return [f"{module}.x*__mutmut_*"]  # functions (x_name) and methods (xǁClassǁname)
    mangled = ["x_" + f if "." not in f else "xǁ{}ǁ{}".format(*f.split(".")) for f in functions]
    return [f"{module}.{name}__mutmut_*" for name in mangled]


def undecorated(source: str) -> str:
    """mutmut 3 never mutates a decorated function: in the scratch copy, a one-line ``@decorator`` (e.g.
    ``@register_distance("l2")``, ``@torch.no_grad()``, ``@property``) becomes ``name = decorator(name)`` after the
    function, which is the same to Python and lets mutmut mutate the function."""
    out, pending, active = [], None, []  # pending: (indent, name, decorator) of the next def; active: after its def
    for line in source.splitlines():
        stripped, indent = line.lstrip(), line[: len(line) - len(line.lstrip())]
        while active and stripped and len(indent) <= len(active[-1][0]) and not stripped.startswith(")"):
            at, name, decorator = active.pop()
            blank = len(out) - len("\n".join(out).rstrip("\n").split("\n"))  # after the function's last line
            out.insert(len(out) - blank, f"{at}{name} = {decorator}({name})")
        if stripped.startswith("@") and stripped[1:] not in ("classmethod", "staticmethod"):
            pending = (indent, stripped[1:].split("  #")[0])
            continue
        if pending and stripped.startswith("def "):
            active.append((pending[0], stripped[4:].split("(")[0], pending[1]))
        elif pending:  # a decorated class or a second decorator: kept as it is
            out.append(pending[0] + "@" + pending[1])
        pending = None
        out.append(line)
    out += [f"{at}{name} = {decorator}({name})" for at, name, decorator in reversed(active)]
    return "\n".join(out) + "\n"


def prepare(workdir: Path, path: str, tests: list[str]) -> None:
    """A fresh copy of the repository with the module's mutmut settings (test files not written yet are left out)."""
    shutil.rmtree(workdir, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "mutants")
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, workdir / folder, ignore=ignore)
    (workdir / path).write_text(undecorated((ROOT / path).read_text()))
    tests = [test for test in tests if not test.startswith("tests/") or (workdir / test.split("::")[0]).exists()]
    settings = {
        "source_paths": ["src"],
        "only_mutate": [path],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-n", "0", "-p", "no:cacheprovider"],
        "use_git_change_detection": False,
    }
    table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    (workdir / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + f"\n[tool.mutmut]\n{table}\n")
    (workdir / "mutants" / "src").mkdir(parents=True)  # on PYTHONPATH from the start (see main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", choices=sorted(MODULES))
    parser.add_argument("--show", action="store_true", help="print each tested survivor's diff")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default /tmp/rglcd-mutation/MODULE)")
    parser.add_argument("--no-run", action="store_true", help="only report the last run's results in the workdir")
    parser.add_argument(
        "--retry", action="store_true", help="with the tests as they are now, rerun only the last run's mutants that "
        "were not killed (the others stay killed while tests are only added): minutes instead of an hour for step"
    )  # fmt: skip
    args = parser.parse_args()
    path, tests, functions = MODULES[args.module]
    workdir = (args.workdir or Path("/tmp/rglcd-mutation") / args.module).resolve()
    meta = workdir / "mutants" / f"{path}.meta"
    patterns = mutant_patterns(path, functions)
    names = patterns if functions else []
    if args.retry:
        for folder in (workdir / "tests", workdir / "mutants" / "tests"):
            shutil.rmtree(folder)
            shutil.copytree(ROOT / "tests", folder, ignore=shutil.ignore_patterns("__pycache__"))
        names = [name for name, code in read_codes(meta, patterns).items() if STATUS.get(code) not in KILLED]
    elif not args.no_run:
        prepare(workdir, path, tests)

    # Tests that start `python -m rglcd` import the mutated copy too (not the editable install's src/).
    env = {**os.environ, "PYTHONPATH": str(workdir / "mutants" / "src")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    start, returncode = time.monotonic(), 0
    if not args.no_run and (names or not args.retry):
        returncode = subprocess.run([mutmut, "run", "--max-children", "1", *names], cwd=workdir, env=env).returncode
    minutes = (time.monotonic() - start) / 60

    if not meta.exists():
        print(f"mutmut run failed (exit {returncode}): no {meta}")
        return 1
    status = {name: STATUS.get(code, "suspicious") for name, code in read_codes(meta, patterns).items()}
    counts = Counter(status.values())
    total = len(status)
    print(f"\n{args.module} ({path}{', functions: ' + ', '.join(functions) if functions else ''}), {minutes:.1f} min")
    print(", ".join(f"{kind} {counts[kind]}" for kind in ("killed", "survived", "timeout", "suspicious", "no tests")))
    print(f"score: {counts['killed']}/{total} = {counts['killed'] / max(total, 1):.1%}")
    others = sorted({kind for kind in counts} - {"killed", "survived", "timeout", "suspicious", "no tests"})
    if others:
        print("also: " + ", ".join(f"{kind} {counts[kind]}" for kind in others))
    for name in sorted(n for n, kind in status.items() if kind not in ("killed",)):
        print(f"  {status[name]}: {name}")
        if args.show and status[name] != "no tests":
            diff = subprocess.run([mutmut, "show", name], cwd=workdir, env=env, capture_output=True, text=True)
            print("\n".join("      " + line for line in diff.stdout.splitlines()[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
