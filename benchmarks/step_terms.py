"""What each loss term costs per training step: LCD alone, + the reward, + DMD, + the GAN, + more fake updates, and
the reward on the 1-step sample with and without DMD (the ``world-one-step`` preset).

    python benchmarks/step_terms.py [--steps 30] [--rounds 2]

`rglcd train world` (the world teacher at 32 px, batch 32: the quickstart's recipe; it needs the world cache that
`rglcd quickstart` fills) runs ``--steps`` steps for each combination of terms. Each run's time is the median of its
steps after the first (``train_summary.json``); the runs are made in ``--rounds`` rounds back to back and each ratio
to LCD + reward (the quickstart's RG-LCM) is taken within a round: the table shows the median over rounds [lowest,
highest].
"""

from __future__ import annotations

from sampler_reward import compare_runs  # this folder's

from rglcd.experiments.one_step import ONE_STEP_RECIPE, ONE_STEP_SAMPLE

MATCHING = ["dmd.weight=1", "dmd.fake_lr=1e-4"]
TERMS = {
    "LCD": ["reward.terms=[]"],
    "LCD + reward (RG-LCM)": [],
    "DMD alone": ["reward.terms=[]", "distill.lcd_weight=0", *MATCHING],
    "LCD + DMD": ["reward.terms=[]", *MATCHING],
    "LCD + DMD + GAN": ["reward.terms=[]", *MATCHING, "gan.weight=0.01"],
    "LCD + DMD + GAN + reward": [*MATCHING, "gan.weight=0.01"],
    "LCD + DMD, 5 fake updates": ["reward.terms=[]", *MATCHING, "dmd.fake_updates=5"],
    "LCD + reward on the 1-step sample (RG-LCM-K1)": list(ONE_STEP_SAMPLE),
    "LCD + DMD 0.3 + reward on the 1-step sample (world-one-step)": list(ONE_STEP_RECIPE),
}
REFERENCE = "LCD + reward (RG-LCM)"


if __name__ == "__main__":
    compare_runs(TERMS, REFERENCE, "loss terms", __doc__, steps=30, rounds=2)
