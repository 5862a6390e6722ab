"""``rglcd ARGS`` that stops inside its Nth training forward pass: it writes MARKER and waits there, so that a test
can kill -9 it mid-step on that event rather than after a guessed time. Usage: stall_at_step.py MARKER N ARGS..."""

import sys
import time
from pathlib import Path

import torch

from rglcd.cli import main
from rglcd.train import loop

marker, stall_at = Path(sys.argv[1]), int(sys.argv[2])
calls = 0
forward = loop.training_forward


def stalling_forward(*args):
    global calls
    calls += 1
    if calls == stall_at:
        marker.write_text(f"in forward {calls}")
        time.sleep(600)  # killed here
    return forward(*args)


loop.training_forward = stalling_forward
torch.set_num_threads(1)  # as the tests' own process (conftest.py): the same float sums, for bit-for-bit comparisons
sys.exit(main(sys.argv[3:]))
