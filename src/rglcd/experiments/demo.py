"""``rglcd demo``: RG-LCD end to end on a tiny teacher that the package builds (CPU, about 30 s).

The teacher has random weights, so its pictures mean nothing; what the demo shows is the whole path a real
run takes: a diffusers folder loaded like a hub checkpoint, webdataset shards, ``rglcd train`` with the
``tiny`` preset (reward through the VAE decoder, checkpoints, validation), the export, and few-step sampling.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..config import load_config
from ..data import write_shards
from ..export import load_lcm
from ..grid import steps_text
from ..sampling import lcm_sample, save_grid
from ..tiny import save_tiny_pipeline
from ..train import train

COLOURS = {"red": (230, 25, 25), "green": (25, 200, 50), "blue": (25, 50, 230), "yellow": (230, 230, 25)}


def colour_samples(count: int, resolution: int, seed: int):
    """Plain-colour pictures with a lighter square and captions naming the colour, deterministic by seed."""
    rng = random.Random(seed)
    for _ in range(count):
        name = rng.choice(list(COLOURS))
        image = Image.new("RGB", (resolution, resolution), COLOURS[name])
        low, high = sorted(rng.sample(range(resolution), 2))
        ImageDraw.Draw(image).rectangle((low, low, high, high), fill=tuple(min(c + 40, 255) for c in COLOURS[name]))
        yield image, f"a {name} picture"


def tiny_setup(
    out: str | Path = "runs/tiny", samples: int = 256, prediction_type: str = "epsilon", seed: int = 0
) -> Path:
    """Write ``out/teacher`` (a tiny random SD pipeline) and ``out/data`` (shards), unless they exist."""
    out = Path(out)
    if not (out / "teacher" / "model_index.json").is_file():
        save_tiny_pipeline(out / "teacher", prediction_type=prediction_type, seed=seed)
    if not any((out / "data").glob("*.tar")):
        write_shards(colour_samples(samples, 32, seed), out / "data", samples_per_shard=64)
    return out


def run_demo(out: str | Path = "runs/tiny", steps: int = 100, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Set up, train with the ``tiny`` preset into ``out/rglcd`` (replacing an earlier demo run there: it is
    scratch), and sample the student at 1, 2 and 4 steps."""
    out = tiny_setup(out, prediction_type=prediction_type, seed=seed)
    config = load_config(
        "tiny",
        [
            f"model.teacher={out / 'teacher'}",
            f"data.source={out / 'data'}",
            f"logging.output_dir={out / 'rglcd'}",
            f"optim.max_train_steps={steps}",
            f"seed={seed}",
        ],
    )
    student_dir = train(config, overwrite=True)
    pipeline = load_lcm(student_dir)
    prompts = [f"a {name} picture" for name in COLOURS]
    for num_steps in (1, 2, 4):
        images = lcm_sample(
            pipeline.unet, pipeline.vae, pipeline, pipeline.scheduler, prompts, num_steps=num_steps,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        save_grid([images], out / "rglcd" / f"samples-{num_steps}-steps.png", prompts, [steps_text(num_steps)])
    return student_dir
