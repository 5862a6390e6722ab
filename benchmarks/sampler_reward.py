"""What the reward on the student's own samples costs per training step, beside the paper's one-step reward.

    python benchmarks/sampler_reward.py [--steps 40] [--rounds 3]

`rglcd train world` (the world teacher at 32 px, batch 32, world-clip β 0.5: the quickstart's recipe; it needs the
world cache that `rglcd quickstart` fills) runs ``--steps`` steps for each reward target: none (plain LCD), the
one-step prediction (the paper), and the student's own K-step sample for K = 2 and 4 (through the last step), and
K = 2 through both steps. Each run's time is the median of its steps after the first (``train_summary.json``). The
machine drifts by ±15 % over minutes, so the runs are made in ``--rounds`` rounds back to back, each ratio to the
prediction target is taken within a round, and the table shows the median over rounds [lowest, highest].
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from train_step import spread  # this folder's

from rglcd.config import load_config
from rglcd.train import train

TARGETS = {
    "none (LCD)": ["reward.terms=[]"],
    "prediction": [],
    "sample K=2": ["reward.target=sample", "reward.sample_steps=2"],
    "sample K=4": ["reward.target=sample", "reward.sample_steps=4"],
    "sample K=2, grad 2": ["reward.target=sample", "reward.sample_steps=2", "reward.grad_steps=2"],
}


def step_milliseconds(overrides: list[str], steps: int) -> float:
    out = Path(tempfile.mkdtemp()) / "run"
    common = [f"logging.output_dir={out}", f"optim.max_train_steps={steps}", "logging.tracker=none"]
    train(load_config("world", [*common, f"logging.checkpointing_steps={steps + 1}", *overrides]))
    return 1000 * json.loads((out / "train_summary.json").read_text())["step_seconds"]["median_after_first"]


def compare_runs(
    runs: dict[str, list[str]], reference: str, subject: str, description: str, steps: int = 40, rounds: int = 3
) -> None:
    """Time each of ``runs`` (label: `rglcd train world` overrides) with ``--steps`` steps in ``--rounds`` rounds
    back to back, and print the median ms per step and each run's ratio to ``reference`` within a round (median
    [lowest, highest] over rounds). ``subject``: the table's first column; ``description``: the script's help;
    ``steps``, ``rounds``: the options' defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="steps of each training run")
    parser.add_argument("--rounds", type=int, default=rounds, help="back-to-back measurements of every run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rounds = [
        {name: step_milliseconds(overrides, args.steps) for name, overrides in runs.items()} for _ in range(args.rounds)
    ]
    print(f"\nrglcd train world: ms per step by {subject} (world teacher, 32 px, batch 32, "
          f"{torch.get_num_threads()} threads, {args.steps} steps per run, {args.rounds} rounds; "
          f"median [lowest, highest] over rounds)")  # fmt: skip
    width, ratio_width = max(map(len, [subject, *runs])) + 2, max(22, len(reference) + 4)
    print(f"{subject:<{width}}{'ms/step':>10}{'/ ' + reference:>{ratio_width}}")
    for name in runs:
        median = statistics.median(r[name] for r in rounds)
        print(f"{name:<{width}}{median:>10.1f}{spread([r[name] / r[reference] for r in rounds]):>{ratio_width}}")


if __name__ == "__main__":
    compare_runs(TARGETS, "prediction", "reward target", __doc__)
