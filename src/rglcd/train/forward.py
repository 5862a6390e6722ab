"""One training forward: the one ``rglcd train`` runs, ``rglcd plan`` traces and the benchmarks time.

Numbered as diffusers' LCD script reads, each line tied to the algorithm (RG-LCD: Li et al. 2024, Alg. 3 and 4;
LCD: Luo et al. 2023, Alg. 1): encode the batch, draw the step's randomness, freeze Alg. 4's proxy, and the step,
whose loss is the sum of its named terms (:func:`rglcd.step.rglcd_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from ..models import Teacher
from ..step import Distillation, MatchingNoise, MatchingTerms, StepOutput, rglcd_step
from .build import Networks, StudentReward, float_conditions, prepare_batch
from .proxy import Proxy


@dataclasses.dataclass
class StepParts:
    """What a training forward reads, built once per run (``rglcd plan`` builds them on fake tensors)."""

    teacher: Teacher  # its VAE and text encoders encode the batch
    networks: Networks  # student, EMA target, teacher UNet
    distillation: Distillation
    reward: StudentReward
    uncond: tuple[torch.Tensor, dict | None]  # the empty prompt's embeddings [B, L, D] and SDXL conditions
    proxy: Proxy | None  # Alg. 4's latent proxy (the reward's R), frozen in the student's backward pass
    resolution: int
    lcd_weight: float  # λ of the consistency term (distill.lcd_weight)
    matching: MatchingTerms | None = None  # DMD's and DMD2's GAN terms on the fake score network (dmd.*, gan.*)


@dataclasses.dataclass
class Forward:
    """A training forward's loss and what the updates after the student's read."""

    output: StepOutput
    latents: torch.Tensor  # [B, C, h, w] z, × the VAE scaling factor
    cond_embeds: torch.Tensor  # [B, L, D] the captions' embeddings, float32
    added_cond: dict | None  # SDXL's added conditions of the captions, float32


def training_forward(
    parts: StepParts,
    batch: dict,
    generator: torch.Generator,
    step: int,
    autocast: contextlib.AbstractContextManager | None = None,
    encoded: Callable[[], None] | None = None,
) -> Forward:
    """The loss of step ``step`` (counted from 0) on ``batch``, with the batch's latents and conditions. Every draw
    comes from ``generator``, in a fixed order. ``autocast``: the run's mixed precision (none: float32).
    ``encoded``: called once the batch is encoded and the noise drawn (``rglcd plan`` ends a memory phase there)."""
    # 1. z ~ E(x)·s from the VAE posterior (or the cached distribution), c = the captions' text embeddings.
    latents, cond_embeds, added = prepare_batch(batch, parts.teacher, generator, parts.resolution)
    # 2. ε ~ N(0, I), n ~ U{0, …, N−1}, w ~ U[w_min, w_max] (Alg. 3), and the sample's noise for reward.target: sample.
    noise = parts.reward.draw(latents, parts.distillation, generator, step)
    if parts.matching is not None:  # DMD's and the GAN's draws come last: a run without them repeats exactly
        noise.matching = MatchingNoise.draw(latents, parts.matching, generator)
    if encoded is not None:
        encoded()
    # 3. Alg. 4: the student maximises the proxy, frozen for this backward pass (it is fitted after the update); so
    #    is the fake score network of the matching terms.
    if parts.proxy is not None:
        parts.proxy.freeze()
    if parts.matching is not None:
        parts.matching.fake_unet.requires_grad_(False)
        if parts.matching.head is not None:
            parts.matching.head.requires_grad_(False)
    # 4. The loss: λ·d(f_θ(z_{t_{n+k}}), f_θ⁻(ẑ_{t_n})) − mean R(x̂_0) on the steps the reward applies (reward.every),
    #    + the DMD and GAN terms of the student's sample from noise.
    uncond_embeds, uncond_added = parts.uncond
    networks, cond_embeds, added = parts.networks, cond_embeds.float(), float_conditions(added)
    with autocast or contextlib.nullcontext():
        output = rglcd_step(
            student=networks.student, target=networks.target, teacher_unet=networks.teacher_unet,
            distillation=parts.distillation, latents=latents, cond_embeds=cond_embeds, uncond_embeds=uncond_embeds,
            added_cond=added, uncond_added_cond=uncond_added, noise=noise, prompts=batch["captions"],
            reward=parts.reward.at(step), consistency_weight=parts.lcd_weight, matching=parts.matching,
        )  # fmt: skip
    return Forward(output, latents, cond_embeds, added)
