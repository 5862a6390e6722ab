"""``rglcd demo``: RG-LCD end to end on a tiny teacher that the package builds (CPU, about a minute).

The teacher has random weights, so the pictures mean nothing; what the demo shows is the whole path a real
run takes: a diffusers folder loaded like a hub checkpoint, the student and its EMA target, the RG-LCD
step with a reward through the VAE decoder, the export, and few-step sampling of the exported pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .losses import ConsistencyDistance
from .models import build_student, build_target, encode_prompts, load_teacher, update_ema
from .rewards import build_reward
from .sampling import export_pipeline, lcm_sample, lcm_scheduler, save_grid
from .step import Distillation, StepNoise, rglcd_step
from .tiny import save_tiny_pipeline

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    steps: int = 30
    batch_size: int = 8
    reward: str = "colorfulness"
    reward_beta: float = 0.1
    learning_rate: float = 1e-4
    ema_decay: float = 0.95
    prediction_type: str = "epsilon"
    seed: int = 0


def synthetic_batch(batch_size: int, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Plain-colour images with a lighter square, and captions naming the colour: [B,3,R,R] in [0,1]."""
    names = list(COLOURS)
    picks = torch.randint(0, len(names), (batch_size,), generator=generator).tolist()
    images = torch.stack([torch.tensor(COLOURS[names[i]]) for i in picks])[:, :, None, None]
    images = images.expand(-1, -1, resolution, resolution).clone()
    quarter = resolution // 4
    images[:, :, quarter : 3 * quarter, quarter : 3 * quarter] += 0.1
    return images.clamp(0, 1), [f"a {names[i]} picture" for i in picks]


def run_demo(config: DemoConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "model_index.json").exists():
        save_tiny_pipeline(teacher_dir, prediction_type=config.prediction_type, seed=config.seed)
    teacher = load_teacher(teacher_dir)
    student = build_student(teacher.unet)
    target = build_target(student)
    distillation = Distillation(teacher.schedule, distance=ConsistencyDistance("huber"))
    reward = build_reward(config.reward)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)

    resolution = teacher.unet.config.sample_size * teacher.vae_scale_factor
    images, captions = synthetic_batch(config.batch_size, resolution, generator)
    with torch.no_grad():
        latents = teacher.vae.encode(images * 2 - 1).latent_dist.sample(generator) * teacher.vae.config.scaling_factor
        cond_embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, captions)
        uncond_embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * config.batch_size)

    history = []
    for step in (progress := tqdm(range(config.steps), desc="RG-LCD demo")):
        noise = StepNoise.draw(latents, distillation, generator)
        output = rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, vae=teacher.vae,
            distillation=distillation, latents=latents, cond_embeds=cond_embeds, uncond_embeds=uncond_embeds,
            noise=noise, prompts=captions, reward_fn=reward, reward_beta=config.reward_beta,
        )  # fmt: skip
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(target.parameters(), student.parameters(), config.ema_decay)
        record = {
            "step": step + 1,
            "loss": output.loss.item(),
            "distill_loss": output.distill_loss.item(),
            "reward": output.reward.mean().item() if output.reward is not None else None,
        }
        history.append(record)
        progress.set_postfix(distill=f"{record['distill_loss']:.4f}", reward=f"{record['reward'] or 0:.3f}")

    student_dir = export_pipeline(out / "student", student, teacher, distillation.num_ddim_timesteps)
    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)
    scheduler = lcm_scheduler(teacher.scheduler_config, distillation.num_ddim_timesteps)
    prompts = [f"a {name} picture" for name in COLOURS]
    for num_steps in (1, 2, 4):
        sampled = lcm_sample(
            student, teacher.vae, teacher.text_encoder, teacher.tokenizer, scheduler, prompts,
            num_steps=num_steps, generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip
        save_grid(sampled, samples_dir / f"steps-{num_steps}.png")
    summary = {"config": {k: str(v) for k, v in vars(config).items()}, "history": history, "student": str(student_dir)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary

