"""Run by tests/test_distributed.py under torchrun: a few RG-LCD steps on this rank's slice of a fixed global batch.

Every rank builds the same student, target, data and noise (fixed seeds), takes the rows of the global batch that
belong to it (a contiguous slice), and trains with accelerate's DDP. The first step's gradients and the final student
and target are saved per rank, so the test can check that the ranks agree with each other and with one process
that took the whole global batch.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from rglcd.losses import ConsistencyDistance
from rglcd.models import build_student, build_target, encode_prompts, load_teacher, reward_input, update_ema
from rglcd.rewards import build_reward
from rglcd.step import Distillation, StepNoise, StepReward, rglcd_step

GLOBAL_BATCH, STEPS = 4, 3
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small yellow star"]


def main(teacher_dir: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    teacher = load_teacher(teacher_dir)
    student = build_student(teacher.unet)
    with torch.no_grad():  # student ≠ teacher, so the guidance embedding gets gradients from the first step
        for parameter in student.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    target = build_target(student)
    # Plain SGD: the update is the averaged gradient itself (Adam would amplify float noise in near-zero gradients).
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-2)
    student, optimizer = accelerator.prepare(student, optimizer)
    distillation = Distillation(teacher.schedule, distance=ConsistencyDistance("huber"), w_min=2.0, w_max=8.0)
    reward = StepReward(build_reward("mix", terms=[{"name": "colorfulness", "beta": 0.5}]), reward_input(teacher.vae))
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(accelerator.process_index * per_rank, (accelerator.process_index + 1) * per_rank)
    generator = torch.Generator().manual_seed(2)  # the same global batches on every rank
    weights = {}
    for step in range(STEPS):
        images = torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=generator)
        with torch.no_grad():
            latents = teacher.vae.encode(images * 2 - 1).latent_dist.mean * teacher.vae.config.scaling_factor
            cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, PROMPTS)
            uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * GLOBAL_BATCH)
        noise = StepNoise.draw(latents, distillation, generator)
        mine = StepNoise(noise.noise[rows], noise.indices[rows], noise.guidance[rows])
        output = rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
            latents=latents[rows], cond_embeds=cond[rows], uncond_embeds=uncond[rows], noise=mine,
            prompts=PROMPTS[rows], reward=reward,
        )  # fmt: skip
        accelerator.backward(output.loss)
        if step == 0:  # DDP has averaged the ranks' gradients: they should be the whole batch's
            model = accelerator.unwrap_model(student)
            weights |= {f"grad.{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(target.parameters(), accelerator.unwrap_model(student).parameters(), 0.95)
    weights |= {f"student.{k}": v.contiguous() for k, v in accelerator.unwrap_model(student).state_dict().items()}
    weights |= {f"target.{k}": v.contiguous() for k, v in target.state_dict().items()}
    save_file(weights, Path(out) / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
