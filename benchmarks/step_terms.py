"""What each loss term costs per training step: LCD alone, + the reward, + DMD, + the GAN, + more fake updates.

    python benchmarks/step_terms.py [--steps 30] [--rounds 2]

`rglcd train world` (the world teacher at 32 px, batch 32: the quickstart's recipe; it needs the world cache that
`rglcd quickstart` fills) runs ``--steps`` steps for each combination of terms. Each run's time is the median of its
steps after the first (``train_summary.json``); the runs are made in ``--rounds`` rounds back to back and each ratio
to LCD + reward (the quickstart's RG-LCM) is taken within a round: the table shows the median over rounds [lowest,
highest].
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from sampler_reward import step_milliseconds  # this folder's
from train_step import spread

MATCHING = ["dmd.weight=1", "dmd.fake_lr=1e-4"]
TERMS = {
    "LCD": ["reward.terms=[]"],
    "LCD + reward (RG-LCM)": [],
    "DMD alone": ["reward.terms=[]", "distill.lcd_weight=0", *MATCHING],
    "LCD + DMD": ["reward.terms=[]", *MATCHING],
    "LCD + DMD + GAN": ["reward.terms=[]", *MATCHING, "gan.weight=0.01"],
    "LCD + DMD + GAN + reward": [*MATCHING, "gan.weight=0.01"],
    "LCD + DMD, 5 fake updates": ["reward.terms=[]", *MATCHING, "dmd.fake_updates=5"],
}
REFERENCE = "LCD + reward (RG-LCM)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steps of each training run")
    parser.add_argument("--rounds", type=int, default=2, help="back-to-back measurements of every combination")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rounds = [
        {name: step_milliseconds(overrides, args.steps) for name, overrides in TERMS.items()}
        for _ in range(args.rounds)
    ]
    threads = torch.get_num_threads()
    print(f"\nrglcd train world: ms per step by loss terms (world teacher, 32 px, batch 32, {threads} threads, "
          f"{args.steps} steps per run, {args.rounds} rounds; median [lowest, highest] over rounds)")  # fmt: skip
    print(f"{'terms':<28}{'ms/step':>10}{'/ RG-LCM':>22}")
    for name in TERMS:
        median = statistics.median(r[name] for r in rounds)
        print(f"{name:<28}{median:>10.1f}{spread([r[name] / r[REFERENCE] for r in rounds]):>22}")


if __name__ == "__main__":
    main()
