"""What ``test_fuzz.py`` found, as regular tests: each input must be refused with exit code 2 and one line naming
the bad value (no traceback), leaving the finished run folder as it was. Run as the fuzz test runs its examples
(``run_example``: a fresh folder, ``{TEACHER}``/``{RUN}``/... filled in, the expensive calls stopped)."""

import pytest

from .test_fuzz import ACCEPTED, error_lines, run_example, stopped  # noqa: F401  (stopped: a fixture)

TINY = ["train", "tiny", "model.teacher=a/b"]  # passes the teacher's check; --dry-run stops before it loads
PLAN = ["plan", "tiny", "model.teacher={TEACHER}"]  # the world teacher: traced for real (about 2 s)

# id: (argv, a fragment the one-line error must hold: it names the bad value or option)
FOUND = {
    # `X | None` fields (float | None, str | None) are not type-checked: the check compares a str with a number.
    "lora.alpha a word": ([*TINY, "lora.alpha=abc", "--dry-run"], "lora.alpha"),
    "distill.distance_c a word": ([*TINY, "distill.distance_c=abc", "--dry-run"], "distill.distance_c"),
    "distill.distance_c non-ASCII": ([*TINY, "distill.distance_c=¨8âÈ", "--dry-run"], "distill.distance_c"),
    # rglcd plan traces the config's sizes without bounds: torch's storage size or index overflows.
    "plan data.resolution 2**31": ([*PLAN, f"data.resolution={2**31}"], "data.resolution"),
    "plan optim.batch_size 2**63": ([*PLAN, f"optim.batch_size={2**63}"], "optim.batch_size"),
    # Adam's own range checks (torch.optim) are the only ones: a traceback from build_optimizer.
    "plan optim.adam_beta1 huge": ([*PLAN, "optim.adam_beta1=" + "9" * 40], "optim.adam_beta1"),
    "plan optim.adam_beta1 1": ([*PLAN, "optim.adam_beta1=1"], "optim.adam_beta1"),
    "plan optim.adam_beta2 -1": ([*PLAN, "optim.adam_beta2=-1"], "optim.adam_beta2"),
    "plan optim.adam_epsilon -1": ([*PLAN, "optim.adam_epsilon=-1"], "optim.adam_epsilon"),
    "plan optim.weight_decay -1": ([*PLAN, "optim.weight_decay=-1"], "optim.weight_decay"),
    # An empty --cache is '.', whose cache_info.json path is built with Path.with_name.
    "lrm pretrain --cache ''": (["lrm", "pretrain", "--cache", "", "--out", "lrm"], "--cache"),
    # The judge's FID features need an even size: pixel_unshuffle raises inside the metric.
    "eval --fid-size odd": (["eval", "--fid-size", "747", "--model", "{TEACHER}"], "--fid-size"),
}


@pytest.mark.parametrize(("argv", "names"), FOUND.values(), ids=FOUND.keys())
def test_found_input_is_a_one_line_error(argv, names, stopped):  # noqa: F811
    outcome = run_example(argv, b"")
    assert outcome.escaped is None, f"rglcd {' '.join(outcome.argv)}: {outcome.escaped}"
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert outcome.code == 2, f"exit {outcome.code} (accepted: {ACCEPTED}): {outcome.stderr}"
    (line,) = error_lines(outcome.stderr)
    assert names in line
    assert not outcome.changed


# Printed to stdout, which on a UTF-8 terminal is strict: a path holding a non-UTF-8 argv byte (here 0xE9, which
# Python passes as the surrogate \udce9) makes the closing print() raise after the work is done.
PRINTABLE = {
    "world data --out non-UTF-8": ["world", "data", "--out", "caf\udce9", "--samples", "2", "--eval-prompts", "2"],
}


@pytest.mark.parametrize("argv", PRINTABLE.values(), ids=PRINTABLE.keys())
def test_found_output_is_printable(argv, stopped):  # noqa: F811
    outcome = run_example(argv, b"")
    assert outcome.problems() == []
