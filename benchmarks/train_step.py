"""The trainer's step beside a plain official-style step and the sum of its unavoidable passes, in one run.

    python benchmarks/train_step.py [--resolutions 32 64] [--batch-size 8] [--steps 60] [--iterations 20] [--rounds 3]

For each resolution, reward (none, or colourfulness through the VAE decoder) and data (images, or an `rglcd cache`
folder), on the tiny SD-layout teacher with the ``tiny`` preset's settings:

- **rglcd**: `rglcd train`'s own code path (``rglcd.train.train``), the median wall-clock time of its steps after the
  first (``train_summary.json``; start-up, the first step and the export are left out).
- **plain**: one step written the way the official LCD / RG-LCD scripts do it, timed here over as many steps: the
  teacher's conditional and unconditional halves as two passes, the batch's VAE encoding and text encoding every
  step, default AdamW (PyTorch's for-loop implementation on the CPU), the EMA as a Python loop over parameters, and
  ``loss.item()`` logged every step; the median over as many steps.
- **passes**: what no step can avoid, each timed alone (median of ``--iterations``): the student's forward and
  backward, the teacher's forward on both halves, the target's forward, the reward's VAE decode with its backward,
  and the trainer's optimizer step (as the config builds it).

It prints both ratios: plain / rglcd (how much faster the trainer is) and rglcd / passes (what the loop costs
beyond its model passes). A shared 2-core machine drifts by ±15 % over minutes, so each configuration is measured in
``--rounds`` rounds of (rglcd, plain, passes) back to back; each ratio is taken within a round, and the table shows
the median over rounds with the lowest and highest in brackets.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from step_breakdown import noisy_inputs, timed  # this folder's

from rglcd.config import load_config
from rglcd.data import is_cache, write_cache
from rglcd.experiments.demo import tiny_setup
from rglcd.models import encode_prompts, load_teacher, reward_input, vae_scale_factor
from rglcd.schedules import boundary_scalings, ddim_step, guidance_scale_embedding, predicted_eps, predicted_x0
from rglcd.step import StepNoise, consistency_function, teacher_ddim_cfg_step
from rglcd.train import train
from rglcd.train.build import build_distillation, build_expert, build_networks, build_optimizers, build_stream


def trainer_config(root: Path, source: Path, resolution: int, reward: bool, batch_size: int, steps: int):
    return load_config(
        "tiny",
        [
            f"model.teacher={root / 'teacher'}", f"data.source={source}", f"data.resolution={resolution}",
            f"optim.batch_size={batch_size}", f"optim.max_train_steps={steps}", f"logging.output_dir={root / 'run'}",
            "logging.validation_steps=0", f"logging.checkpointing_steps={steps + 1}", "logging.tracker=none",
            *([] if reward else ["reward.terms=[]"]),
        ],
    )  # fmt: skip


def rglcd_step_seconds(config) -> float:
    """Median seconds per step of `rglcd train` after its first step."""
    train(config, overwrite=True)
    summary = json.loads((Path(config.logging.output_dir) / "train_summary.json").read_text())
    return summary["step_seconds"]["median_after_first"]


def plain_step_seconds(config, steps: int) -> float:
    """Median seconds per step, after the first, of an official-style step (two teacher passes, per-step encoding,
    for-loop AdamW, Python-loop EMA, a host sync for logging every step)."""
    teacher = load_teacher(config.model.teacher)
    networks = build_networks(config, teacher, torch.device("cpu"))
    student, target, teacher_unet = networks.student, networks.target, networks.teacher_unet
    distillation = build_distillation(config, teacher, student)
    schedule, vae, optim = teacher.schedule, teacher.vae, config.optim
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon, weight_decay=optim.weight_decay, foreach=False,
    )  # fmt: skip
    expert = build_expert(config)
    cached = is_cache(config.data.source)
    batches = iter(build_stream(config, cached, rank=0, world_size=1))
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * optim.batch_size)
    grid, mu = distillation.grid, config.distill.ema_decay
    scalings, kind = (distillation.sigma_data, distillation.timestep_scaling), schedule.prediction_type

    def column(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, 1, 1, 1)

    def step() -> float:
        batch = next(batches)
        with torch.no_grad():
            if cached:
                parameters, cond = batch["latent_parameters"], batch["prompt_embeds"]
            else:
                parameters = vae.encode(batch["pixel_values"]).latent_dist.parameters
                cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, batch["captions"])
            latents = DiagonalGaussianDistribution(parameters).sample(generator) * vae.config.scaling_factor
        noise = StepNoise.draw(latents, distillation, generator)
        start = grid[noise.indices]
        previous = (start - distillation.skip).clamp(min=0)
        noisy = schedule.add_noise(latents, noise.noise, start)
        w_embedding = guidance_scale_embedding(noise.guidance, distillation.time_cond_proj_dim)
        c_skip_start, c_out_start = map(column, boundary_scalings(start, *scalings))
        c_skip, c_out = map(column, boundary_scalings(previous, *scalings))
        output = student(noisy, start, encoder_hidden_states=cond, timestep_cond=w_embedding).sample
        alpha, sigma = schedule.alpha_sigma(start, 4)
        model_pred = c_skip_start * noisy + c_out_start * predicted_x0(output, noisy, alpha, sigma, kind)
        with torch.no_grad():
            cond_out = teacher_unet(noisy, start, encoder_hidden_states=cond).sample
            uncond_out = teacher_unet(noisy, start, encoder_hidden_states=uncond).sample
            w = column(noise.guidance)
            x0 = [predicted_x0(out, noisy, alpha, sigma, kind) for out in (cond_out, uncond_out)]
            eps = [predicted_eps(out, noisy, alpha, sigma, kind) for out in (cond_out, uncond_out)]
            alpha_prev, sigma_prev = schedule.alpha_sigma(previous, 4)
            x_prev = ddim_step(x0[0] + w * (x0[0] - x0[1]), eps[0] + w * (eps[0] - eps[1]), alpha_prev, sigma_prev)
            target_out = target(x_prev, previous, encoder_hidden_states=cond, timestep_cond=w_embedding).sample
            alpha, sigma = schedule.alpha_sigma(previous, 4)
            target_pred = c_skip * x_prev + c_out * predicted_x0(target_out, x_prev, alpha, sigma, kind)
        loss = distillation.distance(model_pred, target_pred).mean()
        if expert is not None:
            loss = loss - expert(reward_input(vae, False)(model_pred), batch["captions"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for target_param, param in zip(target.parameters(), student.parameters(), strict=True):
                target_param.mul_(mu).add_(param, alpha=1 - mu)
        return loss.detach().item()

    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def passes_milliseconds(config, iterations: int) -> dict[str, float]:
    """Each unavoidable pass of one step, timed alone (median milliseconds), with the trainer's own builders."""
    teacher = load_teacher(config.model.teacher)
    networks = build_networks(config, teacher, torch.device("cpu"))
    student, target, teacher_unet = networks.student, networks.target, networks.teacher_unet
    distillation = build_distillation(config, teacher, student)
    optimizer, _ = build_optimizers(config, student, 1)
    batch, size = config.optim.batch_size, config.data.resolution // vae_scale_factor(teacher.vae.config)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=generator)  # [B, C, h, w]
    with torch.no_grad():
        cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, ["a red picture"] * batch)
        uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * batch)
    noise, start, z_start, w_embedding = noisy_inputs(latents, teacher, distillation, generator)

    def student_pass():
        consistency_function(student, z_start, start, w_embedding, cond, distillation).square().mean().backward()

    @torch.no_grad()
    def teacher_pass():
        teacher_ddim_cfg_step(teacher_unet, z_start, noise.indices, noise.guidance, cond, uncond, distillation)

    @torch.no_grad()
    def target_pass():
        consistency_function(target, z_start, start, w_embedding, cond, distillation)

    times = {
        "student fwd+bwd": timed(student_pass, iterations),
        "teacher fwd (both halves)": timed(teacher_pass, iterations),
        "target fwd": timed(target_pass, iterations),
        "optimizer step": timed(optimizer.step, iterations),  # the gradients of the student pass are in place
    }
    expert = build_expert(config)
    if expert is not None:
        prediction = z_start.clone().requires_grad_(True)
        images = reward_input(teacher.vae, False, config.reward.decode_batch_size)
        times["reward: decode+score fwd+bwd"] = timed(
            lambda: expert(images(prediction), ["a red picture"] * batch).mean().backward(), iterations
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="steps of each trainer run and plain loop")
    parser.add_argument("--iterations", type=int, default=20, help="timed runs of each pass")
    parser.add_argument("--rounds", type=int, default=3, help="back-to-back measurements of each configuration")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    root = tiny_setup(Path(tempfile.mkdtemp()) / "tiny", samples=256)
    rows = []
    for resolution in args.resolutions:
        cache = write_cache(
            root / "teacher", root / "data", root / f"cache-{resolution}", resolution=resolution, progress=False
        )
        for reward in (True, False):
            for source_name, source in (("images", root / "data"), ("cache", cache)):
                config = trainer_config(root, source, resolution, reward, args.batch_size, args.steps)
                rounds = []
                for _ in range(args.rounds):
                    ours = rglcd_step_seconds(config) * 1000
                    plain = plain_step_seconds(config, args.steps) * 1000
                    passes = passes_milliseconds(config, args.iterations)
                    rounds.append((ours, plain, sum(passes.values()), passes))
                rows.append((resolution, reward, source_name, rounds))
    print(f"\nrglcd train step vs a plain official-style step and its unavoidable passes: tiny SD-layout teacher, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.steps} steps per loop, "
          f"{args.rounds} rounds; median [lowest, highest] over rounds")  # fmt: skip
    print(f"{'px':>4} {'reward':<8}{'data':<8}{'rglcd ms':>10}{'plain ms':>10}{'passes ms':>11}"
          f"{'plain/rglcd':>22}{'rglcd/passes':>22}")  # fmt: skip
    for resolution, reward, source, rounds in rows:
        ours, plain, passes = (statistics.median(r[i] for r in rounds) for i in range(3))
        speed_up = spread([r[1] / r[0] for r in rounds])
        overhead = spread([r[0] / r[2] for r in rounds])
        print(f"{resolution:>4} {'colour' if reward else 'none':<8}{source:<8}{ours:>10.1f}{plain:>10.1f}"
              f"{passes:>11.1f}{speed_up:>22}{overhead:>22}")  # fmt: skip
    print("\npasses (median ms, first round):")
    for resolution, reward, source, rounds in rows:
        if source == "images":
            listed = ", ".join(f"{name} {ms:.1f}" for name, ms in rounds[0][3].items())
            print(f"  {resolution} px, {'colour' if reward else 'no'} reward: {listed}")


def spread(ratios: list[float]) -> str:
    """'median [lowest, highest]' of per-round ratios."""
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"


if __name__ == "__main__":
    main()
