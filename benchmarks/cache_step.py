"""Batch preparation and the whole RG-LCD step, from images and from the latent cache, on the tiny teacher.

    python benchmarks/cache_step.py [--batch-size 8] [--iterations 20] [--threads 1] [--resolution 32]

From images, a batch is prepared as the trainer does it: TrainStream (read, decode, crop), VAE encode and posterior
sample, text encoding of the captions. From the cache (written once by ``write_cache`` beforehand, not timed):
CachedStream (read the tensors) and a posterior sample from the cached parameters. The whole step is the trainer's
iteration (rglcd.train.forward.training_forward → backward → AdamW → EMA), without a reward and with a
colourfulness reward through the VAE decoder, timed as one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from step_breakdown import timed  # this folder's

from rglcd.data import CachedStream, TrainStream, write_cache
from rglcd.experiments.demo import tiny_setup
from rglcd.models import build_student, build_target, encode_prompts, load_teacher, reward_input, update_ema
from rglcd.rewards import build_reward
from rglcd.step import Distillation, StepReward
from rglcd.train.build import Networks, StudentReward, prepare_batch
from rglcd.train.forward import StepParts, training_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = tiny_setup(Path(tempfile.mkdtemp()) / "tiny", samples=128)
    cache = write_cache(root / "teacher", root / "data", root / "cache", resolution=args.resolution, progress=False)
    teacher = load_teacher(root / "teacher")
    vae, tokenizer, text_encoder = teacher.vae, teacher.tokenizer, teacher.text_encoder
    student = build_student(teacher.unet)
    target = build_target(student)
    distillation = Distillation(teacher.schedule)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    options = {"batch_size": args.batch_size, "shuffle_buffer": 64}
    image_batches = iter(TrainStream(root / "data", resolution=args.resolution, **options))
    cached_batches = iter(CachedStream(cache, **options))
    with torch.no_grad():
        uncond = encode_prompts(tokenizer, text_encoder, [""] * args.batch_size)  # [B, L, D], once per run

    def step_parts(reward) -> StepParts:
        student_reward = StudentReward(StepReward(reward, reward_input(vae)), (1.0,)) if reward else StudentReward(None)
        networks = Networks(student, target, teacher.unet)
        return StepParts(teacher, networks, distillation, student_reward, (uncond, None), None, args.resolution, 1.0)

    def prepare(batches) -> None:
        prepare_batch(next(batches), teacher, generator, args.resolution)

    def whole_step(batches, parts: StepParts) -> None:
        output = training_forward(parts, next(batches), generator, step=0).output
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(target.parameters(), student.parameters(), 0.95)

    plain, rewarded = step_parts(None), step_parts(build_reward("colorfulness"))
    rows = {
        "batch preparation": (lambda: prepare(image_batches), lambda: prepare(cached_batches)),
        "whole step, no reward": (lambda: whole_step(image_batches, plain), lambda: whole_step(cached_batches, plain)),
        "whole step, reward via decoder": (
            lambda: whole_step(image_batches, rewarded),
            lambda: whole_step(cached_batches, rewarded),
        ),
    }
    sample_bytes = sum(path.stat().st_size for path in cache.glob("*.tar")) / 128
    print(f"From images vs from the cache: tiny teacher, batch {args.batch_size}, {args.resolution} px, "
          f"{args.threads} thread(s), median of {args.iterations}; cache {sample_bytes / 1024:.1f} KiB/sample "
          "(float32)")  # fmt: skip
    print(f"{'':<32}{'images ms':>11}{'cache ms':>10}{'images/cache':>14}")
    for name, (images, cached) in rows.items():
        images_ms, cached_ms = timed(images, args.iterations), timed(cached, args.iterations)
        print(f"{name:<32}{images_ms:>11.1f}{cached_ms:>10.1f}{images_ms / cached_ms:>13.2f}x")


if __name__ == "__main__":
    main()
