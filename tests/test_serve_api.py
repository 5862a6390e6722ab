"""`rglcd serve` answering malformed API payloads (wrong types, NaN, out of range, unknown names): an error event
naming the field and one log line, never a traceback. The handler is called directly, and through gradio's own
request path (no server; no model runs, since every payload here is refused first)."""

import asyncio
import math

import pytest
import torch

from rglcd.serve import MAX_SEED, ServedModel, ServeSettings, build_app, request_handler

gr = pytest.importorskip("gradio")

CPU = torch.device("cpu")
MODELS = [ServedModel("LCM", "lcm", None, 50, CPU), ServedModel("teacher", "teacher", None, 1000, CPU)]
# prompt, seed, steps, guidance, scheduler, eta, teacher steps, teacher guidance: a request the models would run
GOOD = ["a red picture", 3, 2, 6.0, "lcm", 0.3, 25, 7.5]
FIELDS = ["prompt", "seed", "steps", "guidance", "scheduler", "eta", "teacher_steps", "teacher_guidance"]
# What gradio's own preprocessing refused with a traceback in the log (a wrong type, NaN, eta 5, an unknown scheduler).
GRADIO_REFUSED = [
    ("seed", "3", f"seed '3': give a whole number from 0 to {MAX_SEED}"),
    ("seed", math.nan, f"seed: give a whole number from 0 to {MAX_SEED}"),
    ("eta", 5, "eta 5: give a number from 0 to 1"),
    ("scheduler", "ddpm", "scheduler 'ddpm': choose lcm or tcd"),
]
MALFORMED = [
    *GRADIO_REFUSED,
    ("seed", [3], f"seed [3]: give a whole number from 0 to {MAX_SEED}"),
    ("seed", 10**30, f"seed {10**30}: give a whole number from 0 to {MAX_SEED}"),
    ("steps", True, "steps True: give a whole number from 1 to 50"),
    ("guidance", "6", "guidance '6': give a number from 0 to 30"),
    ("scheduler", ["lcm"], "scheduler ['lcm']: choose lcm or tcd"),
    ("eta", {"gamma": 0.3}, "eta {'gamma': 0.3}: give a number from 0 to 1"),
    ("teacher_steps", 1e400, "teacher steps: give a whole number from 1 to 1000"),
    ("teacher_guidance", "x" * 1000, "teacher guidance 'xxxxxxxxxxxx...xxxxxxxxxxxxx': give a number from 0 to 30"),
    ("prompt", 42, "Type a prompt first."),
]


def payload(field: str, value) -> list:
    values = list(GOOD)
    values[FIELDS.index(field)] = value
    return values


@pytest.mark.parametrize("field, value, message", MALFORMED)
def test_the_handler_refuses_a_malformed_request_naming_the_field_in_one_log_line(field, value, message, capsys):
    run = request_handler(MODELS, None, ServeSettings([]))
    with pytest.raises(gr.Error) as refused:
        run(*payload(field, value))
    assert refused.value.message == message
    assert capsys.readouterr().err == f"rglcd serve: refused a request: {message}\n"


@pytest.fixture(scope="module")
def app():
    return build_app(MODELS, None, ServeSettings([]))


@pytest.mark.parametrize("field, value, message", GRADIO_REFUSED)
def test_gradio_hands_the_payload_to_the_handler_unprocessed(app, field, value, message, capfd):
    with pytest.raises(gr.Error) as refused:
        asyncio.run(app.process_api(block_fn=0, inputs=payload(field, value), state=None))
    assert refused.value.message == message
    logged = capfd.readouterr()
    assert "Traceback" not in logged.out + logged.err
    assert logged.err.splitlines() == [f"rglcd serve: refused a request: {message}"]
