"""Few-step sampling of an exported student beside its unavoidable passes, and against the teacher's DDIM + CFG.

    python benchmarks/sampling.py [--batch-size 32] [--iterations 10] [--rounds 3]

At the world teacher's size (its UNet, VAE and text encoder with random weights: time does not depend on the
weights), a student is exported as `rglcd train` exports it and loaded back as `rglcd sample` loads it. Printed:

- 4-step sampling (``lcm_sample``: text encoding, noise, 4 UNet calls with the LCMScheduler, VAE decode) beside
  4 UNet forwards + 1 VAE decode timed alone on the same batch: how close sampling is to its passes;
- 2-step sampling beside the teacher's 50-step DDIM with classifier-free guidance (``ddim_cfg_sample``): the speed-up.

Each figure is a median over ``--iterations`` runs; the ratios are taken within each of ``--rounds`` back-to-back
rounds and shown as median [lowest, highest].
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from step_breakdown import timed  # this folder's
from train_step import spread

from rglcd.export import export_pipeline, load_lcm
from rglcd.models import build_student, decode_latents, load_teacher, text_conditioning, vae_scale_factor
from rglcd.sampling import TEACHER_GUIDANCE, TEACHER_STEPS, ddim_cfg_sample, ddim_scheduler, lcm_sample
from rglcd.schedules import guidance_scale_embedding
from rglcd.tiny import sd_pipeline
from rglcd.world.teacher import build_components

PROMPTS = ["a small red circle on the left", "a big blue square", "a green triangle and a yellow circle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    sd_pipeline(*build_components("epsilon")).save_pretrained(root / "teacher")
    teacher = load_teacher(root / "teacher")
    export_pipeline(root / "student", build_student(teacher.unet), teacher)
    student = load_lcm(root / "student")
    unet, vae = student.unet, student.vae
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(args.batch_size)]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(index) for index in range(args.batch_size)]

    def sample(steps: int):
        return lambda: lcm_sample(
            unet, vae, student, student.scheduler, prompts, num_steps=steps, guidance_scale=6.0, generator=generators()
        )

    def teacher_sample():
        ddim_cfg_sample(
            teacher.unet, teacher.vae, teacher, ddim_scheduler(teacher.scheduler_config), prompts,
            num_steps=TEACHER_STEPS, guidance_scale=TEACHER_GUIDANCE, generator=generators(),
        )  # fmt: skip

    with torch.no_grad():
        embeds, _ = text_conditioning(student, prompts, 32)  # [B, L, D]
        size = 32 // vae_scale_factor(vae.config)
        latents = torch.randn(args.batch_size, 4, size, size)  # [B, C, h, w]
        timestep = torch.tensor(999)
        w_embedding = guidance_scale_embedding(torch.full((args.batch_size,), 5.0), unet.config.time_cond_proj_dim)

        def unet_forward():
            unet(latents, timestep, encoder_hidden_states=embeds, timestep_cond=w_embedding)

        rounds = []
        for _ in range(args.rounds):
            four_steps = timed(sample(4), args.iterations)
            decode = timed(lambda: decode_latents(vae, latents), args.iterations)
            passes = 4 * timed(unet_forward, args.iterations) + decode
            two_steps = timed(sample(2), args.iterations)
            ddim = timed(teacher_sample, max(2, args.iterations // 5))
            rounds.append((four_steps, passes, two_steps, ddim))
    four_steps, passes, two_steps, ddim = (statistics.median(r[i] for r in rounds) for i in range(4))
    print(f"\nsampling at the world teacher's size, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; ms per batch (median)")  # fmt: skip
    print(f"  4-step student sampling            {four_steps:9.1f}")
    print(f"  4 UNet forwards + 1 VAE decode     {passes:9.1f}")
    print(f"  sampling / passes                  {spread([r[0] / r[1] for r in rounds]):>22}")
    print(f"  2-step student sampling            {two_steps:9.1f}")
    print(f"  {f'teacher {TEACHER_STEPS}-step DDIM + CFG':<35}{ddim:9.1f}")
    print(f"  teacher / 2-step student           {spread([r[3] / r[2] for r in rounds]):>22}")


if __name__ == "__main__":
    main()
