"""Fuzz every ``rglcd`` command's options and every ``rglcd train`` config field (issue 25, point 4).

Each example runs ``rglcd.cli.main`` in this process (``run_main``) in a fresh folder beside a finished-looking run
folder, with values drawn from type-confusing, boundary, huge, negative, non-finite, non-UTF-8 and path-like
strategies. It must exit 0, or exit 2 with one line on stderr, never print a traceback, and leave the run folder's
files as they were (byte for byte; a refused command adds nothing either).

Nothing long runs: where a command would start its expensive work after its checks (load the only real teacher
here, train, generate, serve, render a world) a patch stops it with exit code ``ACCEPTED``, which counts as success.
Every teacher, model and cache path given is otherwise unusable, so no example can train or sample.

Profiles: ``ci`` (default; few examples, derandomised: the suite stays fast and deterministic) and ``thorough``
(``--hypothesis-profile=thorough``; ``RGLCD_FUZZ_REPORT=FOLDER`` writes each command's tally as JSON there). Every
failure found is a regular test in ``test_fuzz_found.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path

import hypothesis
import pytest
import yaml
from accelerate.state import AcceleratorState
from hypothesis import given, settings
from hypothesis import strategies as st

from rglcd.cli import build_parser
from rglcd.config import RewardTerm, TrainConfig, presets

from .test_cli import run_main

PROFILE = settings.get_current_profile_name()  # tests/conftest.py: "ci" unless --hypothesis-profile=thorough
if PROFILE not in ("ci", "thorough"):
    PROFILE = "ci"
# Slow commands (a real `rglcd plan` trace takes seconds) get fewer examples in ci; thorough runs them all alike.
CI_EXAMPLES = {"train": 30, "train --dry-run": 30, "train (start)": 20, "plan": 8, "eval": 10, "serve": 10}

ACCEPTED = 75  # the exit code of a patched expensive call: the command's checks all passed
EXAMPLE_SECONDS = 60  # an example still running after this is a failure (a hang on some input)
WORLD_TEACHER = Path(__file__).resolve().parents[1] / "src" / "rglcd" / "world" / "weights" / "teacher"

# Values as a user types them (strings: argv and override values are parsed by rglcd itself).
BOUNDARY = ["0", "-1", "1", "2", str(2**31 - 1), str(2**31), str(2**63 - 1), str(2**63), str(-(2**63))]
HUGE = ["1e308", "1e309", "9" * 40, str(10**100), "1e-320", "123456789012345678901234567890.5"]
NEGATIVE = ["-0.5", "-1e-9", "-0", "-0.0", "-2147483649", "-1e308"]
NON_FINITE = ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "NaN", "Infinity", "-Infinity"]
TYPE_CONFUSING = [
    "[1, 2]", "[]", "{a: 1}", "{}", "true", "false", "yes", "no", "null", "~", "abc", "1.5", "'3'", "0x10",
    "1_000", "[nan]", "{name: x}", ":", "- a", "'", '"', "[1", "!!python/object/apply:os.system ['true']",
    "&a [*a]", "1,2", "0,0.5,1", "a=b", "--help",
]  # fmt: skip
NON_UTF8 = ["\udcff\udcfe", "caf\udce9", "\ufeffx", "é", "日本", "\t", " ", "a\nb"]  # \udcXX: a non-UTF-8 argv byte
PATHS = [
    "{RUN}", "{RUN}/config.yaml", "{RUN}/checkpoints", "{RUN}/checkpoints/checkpoint-2", "{RUN}/student",
    "{RUN}/checkpoints/checkpoint-2/trainer_state.json", "{MISSING}", "{FILE}", "{DIR}", "{FILE}/below", "{TEACHER}",
    "..", ".", "~", "~/x", "", "/dev/null", "a/b", "pipe:true", "{CONFIG}",
]  # fmt: skip
SCALARS = BOUNDARY + HUGE + NEGATIVE + NON_FINITE + TYPE_CONFUSING + NON_UTF8
# argv cannot hold NUL; everything else a shell can pass.
ARGV_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)


def fuzz_value(extra: list[str] = ()) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(SCALARS), st.sampled_from(PATHS), st.integers().map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr), ARGV_TEXT,
        *([st.sampled_from(list(extra))] * 3 if extra else []),
    )  # fmt: skip


# ---------------------------------------------------------------- the config fields of `rglcd train`


def config_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """Every leaf field of the config as (dotted name, type hint), nested dataclasses walked: a new field is fuzzed
    without a change here."""
    hints, found = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            found += config_fields(hint, f"{prefix}{field.name}.")
        else:
            found.append((f"{prefix}{field.name}", hint))
    return found


FIELDS = config_fields()
LIST_ITEM_FIELDS = {  # list[SomeDataclass] fields (reward.terms): their items' fields are fuzzed too
    name: [item_name for item_name, _ in config_fields(typing.get_args(hint)[0])]
    for name, hint in FIELDS
    if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0])
}
GOOD_REWARDS = ["world-clip", "colorfulness"]  # registered, and cheap to build


def plausible(hint: typing.Any) -> list[str]:
    """Values the field takes (so that other fields' checks are reached too)."""
    if typing.get_origin(hint) is typing.Literal:
        return [str(value) for value in typing.get_args(hint)]
    return {bool: ["true", "false"], int: ["1", "4", "8"], float: ["0.5", "1e-5"]}.get(hint, [])


def python_value() -> st.SearchStrategy:
    """A YAML config file's values."""
    scalars = st.one_of(
        st.sampled_from([0, -1, 1, 2, 2**31, 2**63, -(2**63), 10**100, True, False, None]),
        st.floats(), st.text(max_size=8), st.sampled_from(PATHS), st.sampled_from(GOOD_REWARDS),
    )  # fmt: skip
    nested = lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    return st.recursive(scalars, nested, max_leaves=6)


@st.composite
def override(draw) -> str:
    name, hint = draw(st.sampled_from(FIELDS))
    if name in LIST_ITEM_FIELDS and draw(st.booleans()):
        item = {"name": draw(st.sampled_from([*GOOD_REWARDS, "nope", ""]))}
        for key in draw(st.lists(st.sampled_from(LIST_ITEM_FIELDS[name]), max_size=3)):
            item[key] = draw(st.sampled_from(SCALARS + PATHS))
        return f"{name}=[{{{', '.join(f'{key}: {value}' for key, value in item.items())}}}]"
    return f"{name}={draw(fuzz_value(plausible(hint)))}"


@st.composite
def config_file(draw) -> bytes:
    """A YAML config: fuzzed fields as UTF-8, UTF-16 or Latin-1 (with or without a BOM), or any bytes."""
    kind = draw(st.sampled_from(["fields", "fields", "bytes", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "text":
        return draw(st.text(max_size=64)).encode("utf-8", "surrogatepass")
    data: dict = {}
    for name, _ in draw(st.lists(st.sampled_from(FIELDS), max_size=5)):
        *sections, leaf = name.split(".")
        target = data
        for section in sections:
            target = target.setdefault(section, {}) if isinstance(target.get(section, {}), dict) else {}
        target[leaf] = draw(python_value())
    text = yaml.safe_dump(data, allow_unicode=True)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, "replace")


# ---------------------------------------------------------------- argv of every command


def leaf_parsers() -> dict[str, typing.Any]:
    """Every command's argparse parser, by its words ('train', 'world data', ...)."""
    found = {}

    def walk(parser, words):
        subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers:
            found[" ".join(words)] = parser
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, [*words, name])

    walk(build_parser(), [])
    return found


PARSERS = leaf_parsers()
COMMANDS = sorted(PARSERS)
# Per option: values that pass its own checks, so that later checks are reached.
GOOD_VALUES = {
    "--model": ["{TEACHER}", "teacher={TEACHER}", "x={RUN}/student"], "--teacher": ["{TEACHER}"],
    "--prompt": ["a red circle"], "--prompts-file": ["{PROMPTS}"], "--prompts": ["world", "world:4", "{PROMPTS}"],
    "--reward": GOOD_REWARDS, "--metrics": ["world-clip", "hf_ratio", "judge", "nope"], "--device": ["cpu", "auto"],
    "--data": ["{DIR}", "pipe:true"], "--cache": ["{DIR}", "{RUN}"],
    "--resume": ["latest", "{RUN}/checkpoints/checkpoint-2"],
    "--gpu-memory": ["24GiB", "80GB", "0GiB"], "--reward-kwargs": ['{"world-clip": {"x": 1}}', "[]"],
}  # fmt: skip


def options(parser) -> list:
    return [a for a in parser._actions if a.option_strings and a.option_strings[0] not in ("-h", "--help")]


@st.composite
def option_args(draw, parser, required_only_good: bool) -> list[str]:
    argv = []
    chosen = {a for a in options(parser) if a.required}
    chosen |= (
        set(draw(st.lists(st.sampled_from(options(parser)), max_size=4, unique_by=id))) if options(parser) else set()
    )
    for action in sorted(chosen, key=lambda a: a.option_strings[0]):
        name = action.option_strings[0]
        if action.nargs == 0:
            argv.append(name)
            continue
        good = [str(choice) for choice in action.choices or ()] + GOOD_VALUES.get(name, [])
        if action.default not in (None, False) and not isinstance(action.default, (tuple, dict)):
            good.append(str(action.default))
        value = draw(st.sampled_from(good)) if good and (required_only_good or draw(st.booleans())) else None
        argv += [name, value if value is not None else draw(fuzz_value(good))]
    return argv


@st.composite
def command_argv(draw, command: str) -> list[str]:
    parser = PARSERS[command]
    argv = command.split()
    if command in ("train", "plan"):
        config = draw(st.sampled_from([*presets(), "{CONFIG}", "{CONFIG}", "tiny", "tiny", "tiny", "tiny", None]))
        argv.append(config if config is not None else draw(fuzz_value()))
        base = {
            "model.teacher": draw(st.sampled_from(["{TEACHER}", "{TEACHER}", "{DIR}", "a/b", "{MISSING}"])),
            "data.source": draw(st.sampled_from(["{DIR}", "{RUN}", "{MISSING}", "pipe:true"])),
            "logging.output_dir": draw(st.sampled_from(["{RUN}", "{RUN}", "{OUT}", "{DIR}", "{FILE}", "~", ".."])),
        }
        argv += [f"{key}={value}" for key, value in base.items() if draw(st.integers(0, 4))]
        argv += draw(st.lists(override(), max_size=draw(st.sampled_from([0, 1, 2, 4]))))
    argv += draw(option_args(parser, required_only_good=draw(st.booleans())))
    if command == "train" and "--resume" not in argv and draw(st.booleans()):
        argv += ["--resume", draw(st.sampled_from(["latest", "latest", "{RUN}/checkpoints/checkpoint-2"]))]
    return argv


# ---------------------------------------------------------------- one example


@dataclasses.dataclass
class Workspace:
    """A fresh folder per example: the finished-looking run, bad files of each kind, an unusable HOME and cache."""

    root: Path

    def __post_init__(self):
        run = self.root / "run"
        (run / "checkpoints" / "checkpoint-2" / "student").mkdir(parents=True)
        (run / "config.yaml").write_text("optim:\n  max_train_steps: 2\nseed: 0\n")
        state = {"global_step": 2, "nan_streak": 0, "data": [{}], "run_id": "fuzz"}
        (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
        (run / "checkpoints" / "checkpoint-2" / "student" / "diffusion_pytorch_model.safetensors").write_bytes(
            b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
        )
        (run / "student").mkdir()
        (run / "student" / "model_index.json").write_text('{"_class_name": "LatentConsistencyModelPipeline"}')
        (self.root / "a-file").write_text("not a folder\n")
        (self.root / "a-folder").mkdir()
        (self.root / "prompts.txt").write_text("a red circle\n")
        for folder in ("home", "cache", "cwd/inner"):
            (self.root / folder).mkdir(parents=True)

    @property
    def run(self) -> Path:
        return self.root / "run"

    def fill(self, argv: list[str], config: bytes) -> list[str]:
        (self.root / "config.yaml").write_bytes(config)
        places = {
            "{RUN}": self.run, "{MISSING}": self.root / "nowhere" / "deeper", "{FILE}": self.root / "a-file",
            "{DIR}": self.root / "a-folder", "{TEACHER}": WORLD_TEACHER, "{CONFIG}": self.root / "config.yaml",
            "{OUT}": self.root / "new-run", "{PROMPTS}": self.root / "prompts.txt",
        }  # fmt: skip
        filled = []
        for arg in argv:
            for key, path in places.items():
                arg = arg.replace(key, str(path))
            filled.append(arg)
        return filled


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder, by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<folder>"
    return found


class TooSlow(BaseException):
    """An example ran past EXAMPLE_SECONDS."""


@dataclasses.dataclass
class Outcome:
    argv: list[str]
    code: int | None
    stdout: str = ""
    stderr: str = ""
    escaped: str | None = None  # an exception that left main: type, message and the raising line
    changed: list[str] = dataclasses.field(default_factory=list)  # the run folder's paths changed, removed, added

    def problems(self) -> list[tuple[str, str]]:
        """(kind, detail) of each broken promise; kind names the failure class for de-duplication."""
        found = []
        if self.escaped:
            found.append(("traceback", self.escaped))
        elif self.code not in (0, 2, ACCEPTED):
            found.append(("exit code", f"exit {self.code}: {self.stderr.strip()[-300:]}"))
        if "Traceback" in self.stdout + self.stderr:
            found.append(("traceback printed", self.stderr.strip()[-300:]))
        if self.code == 2 and not self.escaped:
            lines = error_lines(self.stderr)
            if len(lines) != 1:
                found.append(("not one line", " | ".join(lines)[:300]))
        try:
            self.stdout.encode("utf-8")
        except UnicodeEncodeError as error:  # a UTF-8 terminal's stdout is strict: print() would raise
            found.append(("unprintable stdout", str(error)[:200]))
        if self.changed:
            found.append(("run folder changed", ", ".join(self.changed)[:300]))
        return found


# tqdm's bar (diffusers' "Loading pipeline components...", rendered scenes): a terminal redraws it in place, after \r.
PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without progress bars and without argparse's usage block (``usage: ...`` and its indented
    continuation lines), which precedes argparse's own one-line error."""
    lines = [PROGRESS_BAR.sub("", line) for line in re.split(r"[\r\n]+", stderr)]
    lines = [line for line in lines if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines[1:] if not line.startswith(" ")]
    return lines


def run_example(argv: list[str], config: bytes) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="rglcd-fuzz-") as folder:
        space = Workspace(Path(folder))
        filled = space.fill(argv, config)
        before, empty_before = snapshot(space.run), snapshot(space.root / "a-folder")
        env = {"HOME": str(space.root / "home"), "RGLCD_CACHE": str(space.root / "cache")}
        saved_env = {key: os.environ.get(key) for key in env}
        saved_cwd = os.getcwd()
        previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TooSlow()))
        os.environ.update(env)
        os.chdir(space.root / "cwd" / "inner")  # '..' and relative outputs stay inside the example's folder
        # One process runs every example: accelerate's process-wide state would refuse a second mixed precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        signal.alarm(EXAMPLE_SECONDS)
        try:
            result = run_main(*filled, check=False)
            outcome = Outcome(filled, result.returncode, result.stdout, result.stderr)
        except TooSlow:
            outcome = Outcome(filled, None, escaped=f"TooSlow: still running after {EXAMPLE_SECONDS} s")
        except BaseException as error:
            outcome = Outcome(filled, None, escaped=describe(error))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            os.chdir(saved_cwd)
            for key, value in saved_env.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        after = snapshot(space.run) if space.run.is_dir() else {}
        refused = outcome.code == 2 or outcome.escaped
        outcome.changed = [f"{key} removed" for key in before if key not in after]
        outcome.changed += [f"{key} changed" for key in before if key in after and after[key] != before[key]]
        outcome.changed += [f"{key} added" for key in after if key not in before and refused]
        if argv[0] == "train" and refused and snapshot(space.root / "a-folder") != empty_before:
            outcome.changed.append("a refused start wrote into an existing empty folder")  # (issue 25: nothing written)
        if (
            argv[0] == "train" and outcome.code == ACCEPTED and "--resume" not in argv and "--overwrite" not in argv
            and output_dir(filled) == str(space.run)
        ):  # fmt: skip
            outcome.changed.append("a new run was accepted into the finished run's folder (no --resume/--overwrite)")
        return outcome


def output_dir(argv: list[str]) -> str | None:
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("logging.output_dir=")]
    return given[-1].rstrip("/") if given else None


def describe(error: BaseException) -> str:
    """The exception and the innermost rglcd line that raised or called into it."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if "/rglcd/" in frame.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    place = f" at {Path(where.filename).name}:{where.lineno} ({where.name})" if where else ""
    message = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}{place}: {message}"


# ---------------------------------------------------------------- the expensive calls, stopped


def accepted(*_, **__):
    raise SystemExit(ACCEPTED)


def is_real_teacher(source) -> bool:
    try:
        return Path(source).resolve() == WORLD_TEACHER.resolve()
    except (OSError, ValueError, TypeError):
        return False


@pytest.fixture(scope="module")
def stopped():
    """Every expensive call of the commands stops the example as accepted; checks before it run for real."""
    import importlib

    for name in (
        "rglcd.train", "rglcd.train.loop", "rglcd.data.cache", "rglcd.evaluate", "rglcd.eval_command", "rglcd.serve",
        "rglcd.plan", "rglcd.lrm", "rglcd.world.data", "rglcd.world.teacher", "rglcd.world.rewards",
        "rglcd.world.judge",
        "rglcd.experiments.quickstart", "rglcd.experiments.overoptimisation", "rglcd.experiments.sampler_reward",
        "rglcd.experiments.one_step", "rglcd.experiments.demo",
    ):  # fmt: skip
        importlib.import_module(name)
    import rglcd.models.teacher
    import rglcd.plan
    import rglcd.world.data

    real_load_teacher, real_make_plan = rglcd.models.teacher.load_teacher, rglcd.plan.make_plan
    real_shards, real_eval_scenes = rglcd.world.data.write_world_shards, rglcd.world.data.eval_scenes

    def load_teacher(source, *args, **kwargs):  # the only real teacher here: loading it means the checks passed
        if is_real_teacher(source):
            accepted()
        return real_load_teacher(source, *args, **kwargs)

    def make_plan(config, *args, **kwargs):  # traced for the world teacher only: a preset's takes 15 s
        if not is_real_teacher(config.model.teacher):
            accepted()
        return real_make_plan(config, *args, **kwargs)

    def write_world_shards(out, samples, *args, **kwargs):  # a few scenes: the folder's handling is what is tested
        return real_shards(out, min(samples, 2), *args, **kwargs)

    def eval_scenes(count=128, *args, **kwargs):
        return real_eval_scenes(min(count, 2), *args, **kwargs)

    stops = {
        "rglcd.models": ["place"],  # rglcd sample, once its model loaded
        "rglcd.train.loop": ["run_steps"],  # (the teacher's load stops a run first)
        "rglcd.eval_command": ["evaluate"],
        "rglcd.serve": ["build_app"],  # never a server
        "rglcd.world.teacher": ["train_world_teacher"], "rglcd.world.rewards": ["train_world_clip"],
        "rglcd.world.judge": ["train_judge"], "rglcd.experiments.demo": ["tiny_setup"],
        **{f"rglcd.experiments.{name}": ["prepare_world"] for name in ("quickstart", "overoptimisation",
                                                                       "sampler_reward", "one_step")},
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for module in [m for name, m in sys.modules.items() if name.startswith("rglcd") and m is not None]:
            if getattr(module, "load_teacher", None) is real_load_teacher:
                patch.setattr(module, "load_teacher", load_teacher)
        for module, names in stops.items():
            for name in names:
                patch.setattr(f"{module}.{name}", accepted)
        patch.setattr(rglcd.world.data, "write_world_shards", write_world_shards)
        patch.setattr(rglcd.world.data, "eval_scenes", eval_scenes)
        patch.setattr(rglcd.plan, "make_plan", make_plan)
        yield


# ---------------------------------------------------------------- the tests


class Tally:
    """What one command's fuzzing tried and found: counts, and the shortest argv of each distinct failure."""

    def __init__(self, command: str):
        self.command, self.tried, self.clean, self.tracebacks, self.data_loss = command, 0, 0, 0, 0
        self.failures: dict[tuple[str, str], list[str]] = {}
        self.details: dict[tuple[str, str], str] = {}

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        problems = outcome.problems()
        self.clean += not problems
        self.tracebacks += any(kind.startswith("traceback") for kind, _ in problems)
        self.data_loss += any(kind == "run folder changed" for kind, _ in problems)
        for kind, detail in problems:
            key = (kind, signature(kind, detail))
            if key not in self.failures or len(" ".join(outcome.argv)) < len(" ".join(self.failures[key])):
                self.failures[key], self.details[key] = outcome.argv, detail

    def summary(self) -> dict:
        return {
            "command": self.command, "profile": PROFILE, "tried": self.tried, "clean": self.clean,
            "tracebacks": self.tracebacks, "run_folder_changed": self.data_loss,
            "failures": [{"kind": kind, "signature": sig, "argv": argv, "detail": self.details[(kind, sig)]}
                         for (kind, sig), argv in self.failures.items()],
        }  # fmt: skip

    def report(self) -> str:
        lines = [
            f"rglcd {self.command}: {self.tried} tried, {self.clean} clean, {len(self.failures)} distinct failures"
        ]
        for (kind, _), argv in self.failures.items():
            lines.append(f"  {kind}: {self.details[(kind, _)]}\n    rglcd {' '.join(map(repr, argv))}")
        return "\n".join(lines)


def signature(kind: str, detail: str) -> str:
    """The failure without its values: numbers, quoted values and paths blanked."""
    if kind.startswith("traceback") or kind == "exit code":
        detail = detail.split(":")[0] + ":" + detail.split(":")[1] if detail.count(":") >= 2 else detail
    detail = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|-?\d[\d.e+-]*", "_", detail)
    return detail[:120] if kind != "run folder changed" else re.sub(r" (changed|removed|added)", r"", detail)[:120]


def fuzz(command: str, strategy: st.SearchStrategy, always: Sequence[list[str]] = ()) -> Tally:
    """Run ``strategy``'s (argv, config file bytes) examples, and the argv ``always`` in every profile; the tally of
    what they did."""
    tally = Tally(command)
    examples = settings.get_profile(PROFILE).max_examples
    if PROFILE == "ci":
        examples = CI_EXAMPLES.get(command, CI_EXAMPLES.get(command.split()[0], examples))

    @settings(settings.get_profile(PROFILE), max_examples=examples)
    @given(strategy)
    def example(case):
        argv, config = case
        outcome = run_example(argv, config)
        tally.add(outcome)
        if log is not None:
            log.write(
                json.dumps(
                    {
                        "argv": outcome.argv,
                        "code": outcome.code,
                        "stderr": outcome.stderr[-300:],
                        "escaped": outcome.escaped,
                        "problems": outcome.problems(),
                    }
                )
                + "\n"
            )

    report_folder = os.environ.get("RGLCD_FUZZ_REPORT")
    name = command.replace(" ", "-")
    log = open(Path(report_folder) / f"{name}-{PROFILE}.jsonl", "w") if report_folder else None

    for argv in always:
        example = hypothesis.example((argv, b""))(example)
    try:
        example()
    finally:
        if log is not None:
            log.close()
    if report_folder:
        (Path(report_folder) / f"{name}-{PROFILE}.json").write_text(json.dumps(tally.summary(), indent=2))
    return tally


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_succeeds_or_refuses_in_one_line(command, stopped):
    tally = fuzz(command, st.tuples(command_argv(command), config_file()))
    assert tally.tried > 0
    assert not tally.failures, tally.report()


def test_every_config_field_is_fuzzed():
    """The fields come from the dataclasses: a new one joins the fuzzing without a change here."""
    names = {name for name, _ in FIELDS}
    assert {"model.teacher", "reward.latent.beta", "logging.output_dir", "seed", "reward.terms"} <= names
    assert LIST_ITEM_FIELDS["reward.terms"] == [field.name for field in dataclasses.fields(RewardTerm)]


def test_every_command_is_fuzzed():
    assert {"train", "plan", "cache", "sample", "eval", "serve", "lrm pretrain", "world data", "world teacher",
            "world rewards", "world judge", "world overoptimisation", "world sampler-reward", "world one-step",
            "quickstart", "demo"} == set(COMMANDS)  # fmt: skip


def test_train_dry_run_fuzzes_only_the_config(stopped):
    """--dry-run: every config field, from overrides and from a YAML file, validated and printed, never run."""
    strategy = st.tuples(
        st.builds(lambda config, overrides: ["train", config, *overrides, "--dry-run"],
                  st.sampled_from([*presets(), "{CONFIG}"]), st.lists(override(), max_size=5)),
        config_file(),
    )  # fmt: skip
    tally = fuzz("train --dry-run", strategy)
    assert not tally.failures, tally.report()


@st.composite
def train_start(draw) -> list[str]:
    """A start that passes the config's checks unless a fuzzed field says otherwise, into the finished run's folder,
    a new one, a file or an empty folder, as a new run, with --overwrite or with --resume."""
    argv = ["train", "tiny", f"model.teacher={draw(st.sampled_from(['{TEACHER}', '{TEACHER}', '{DIR}', 'a/b']))}"]
    argv.append(f"data.source={draw(st.sampled_from(['{DIR}', '{MISSING}', '{RUN}', 'pipe:true']))}")
    argv.append(f"logging.output_dir={draw(st.sampled_from(['{RUN}', '{RUN}', '{RUN}', '{OUT}', '{DIR}', '{FILE}']))}")
    argv += draw(st.lists(override(), max_size=draw(st.sampled_from([0, 0, 1, 2]))))
    argv += draw(st.sampled_from([[], ["--overwrite"], ["--resume", "latest"], ["--resume", "latest", "--overwrite"],
                                  ["--resume", "{RUN}/checkpoints/checkpoint-2"]]))  # fmt: skip
    return argv


def test_train_starts_leave_a_finished_run_as_it_was(stopped):
    """Without --dry-run: a start is refused in one line, or accepted (the teacher's load is reached) without a
    byte of the finished run changed; a new run into it needs --resume or --overwrite."""
    start = ["train", "tiny", "data.source={DIR}", "logging.output_dir={RUN}"]
    always = [  # issue 25's cases: --overwrite deleted before the teacher was checked; a resume rewrote config.yaml
        [*start, "model.teacher=a/b", "--overwrite"], [*start, "model.teacher={DIR}", "--overwrite"],
        [*start, "model.teacher={TEACHER}", "--overwrite"], [*start, "model.teacher={TEACHER}", "--resume", "latest"],
        [*start, "model.teacher={DIR}", "optim.max_train_steps=8", "--resume", "latest"],
        ["train", "tiny", "data.source={DIR}", "logging.output_dir={DIR}", "model.teacher=a/b"],
    ]  # fmt: skip
    tally = fuzz("train (start)", st.tuples(train_start(), config_file()), always)
    assert not tally.failures, tally.report()
