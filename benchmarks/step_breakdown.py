"""Time each part of one RG-LCD training step on the tiny teacher, and the whole step beside their sum.

    python benchmarks/step_breakdown.py [--batch-size 8] [--iterations 20] [--threads 1]

Parts are timed one at a time with the same functions the trainer calls; "whole step" is the trainer's
iteration (data → text → VAE → rglcd_step → backward → AdamW → EMA) timed as one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rglcd.data import TrainStream
from rglcd.experiments.demo import tiny_setup
from rglcd.models import (
    build_student,
    build_target,
    decode_latents,
    encode_prompts,
    load_teacher,
    reward_input,
    update_ema,
)
from rglcd.rewards import build_reward
from rglcd.schedules import guidance_scale_embedding
from rglcd.step import Distillation, StepNoise, StepReward, consistency_function, teacher_ddim_cfg_step
from rglcd.train.build import Networks, StudentReward
from rglcd.train.forward import StepParts, training_forward


def timed(function, iterations: int) -> float:
    """Median milliseconds of ``function()`` over ``iterations`` runs, after one warm-up run."""
    function()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def noisy_inputs(latents, teacher, distillation, generator):
    """A step's draw and what its passes read: (noise, t_{n+k} [B], z_{t_{n+k}} [B, C, h, w], w's embedding [B, D])."""
    noise = StepNoise.draw(latents, distillation, generator)
    start = distillation.grid[noise.indices]
    z_start = teacher.schedule.add_noise(latents, noise.noise, start)
    return noise, start, z_start, guidance_scale_embedding(noise.guidance, distillation.time_cond_proj_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = tiny_setup(Path(tempfile.mkdtemp()) / "tiny", samples=128)
    teacher = load_teacher(root / "teacher")
    student = build_student(teacher.unet)
    target = build_target(student)
    distillation = Distillation(teacher.schedule)
    reward = build_reward("colorfulness")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    batches = iter(TrainStream(str(root / "data"), resolution=32, batch_size=args.batch_size, shuffle_buffer=64))

    batch = next(batches)
    captions = batch["captions"]
    with torch.no_grad():
        latents = teacher.vae.encode(batch["pixel_values"]).latent_dist.mean * teacher.vae.config.scaling_factor
        cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, captions)
        uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * len(captions))
    noise, start, z_start, w_embedding = noisy_inputs(latents, teacher, distillation, generator)

    def student_pass():
        consistency_function(student, z_start, start, w_embedding, cond, distillation).square().mean().backward()
        student.zero_grad(set_to_none=True)

    @torch.no_grad()
    def target_pass():
        consistency_function(target, z_start, start, w_embedding, cond, distillation)

    prediction = z_start.clone().requires_grad_(True)

    def reward_pass():
        reward(decode_latents(teacher.vae, prediction), captions).mean().backward()

    def optimizer_step():
        for parameter in student.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    student_reward = StudentReward(StepReward(reward, reward_input(teacher.vae)), betas=(1.0,))
    step_parts = StepParts(
        teacher, Networks(student, target, teacher.unet), distillation, student_reward, (uncond, None), None, 32, 1.0
    )

    def whole_step():  # the trainer's iteration: rglcd.train's forward, backward, AdamW, EMA
        output = training_forward(step_parts, next(batches), generator, step=0).output
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(target.parameters(), student.parameters(), 0.95)

    parts = {
        "data (decode + crop)": lambda: next(batches),
        "text encoding": lambda: encode_prompts(teacher.tokenizer, teacher.text_encoder, captions),
        "VAE encode": lambda: teacher.vae.encode(batch["pixel_values"]).latent_dist.sample(generator),
        "teacher (cond+uncond, DDIM)": lambda: teacher_ddim_cfg_step(
            teacher.unet, z_start, noise.indices, noise.guidance, cond, uncond, distillation
        ),
        "target": target_pass,
        "EMA update": lambda: update_ema(target.parameters(), student.parameters(), 0.95),
    }
    with torch.no_grad():  # the frozen parts run without autograd in the trainer too
        times = {name: timed(function, args.iterations) for name, function in parts.items()}
    times["student fwd+bwd"] = timed(student_pass, args.iterations)
    times["reward decode+score (fwd+bwd)"] = timed(reward_pass, args.iterations)
    times["optimizer (AdamW)"] = timed(optimizer_step, args.iterations)
    whole = timed(whole_step, args.iterations)

    total = sum(times.values())
    print(f"RG-LCD step breakdown: tiny teacher, batch {args.batch_size}, 32 px, {args.threads} thread(s), "
          f"median of {args.iterations}")  # fmt: skip
    print(f"{'part':<32}{'ms':>9}{'share':>8}")
    for name, ms in sorted(times.items(), key=lambda item: -item[1]):
        print(f"{name:<32}{ms:>9.1f}{ms / total:>8.0%}")
    print(f"{'sum of parts':<32}{total:>9.1f}")
    print(f"{'whole step':<32}{whole:>9.1f}")
    print(f"whole step / sum of parts = {whole / total:.2f}")


if __name__ == "__main__":
    main()
