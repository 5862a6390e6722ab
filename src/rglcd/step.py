"""One RG-LCD training step (Li et al. 2024, Alg. 3; LCD = Luo et al. 2023, Alg. 1) as a single function.

All randomness (ε, the DDIM-grid indices n, the guidance scales w) comes in through :class:`StepNoise`, so
a step is reproducible and can be checked against an independent implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .devices import host_to_device
from .losses import ConsistencyDistance
from .schedules import (
    NoiseSchedule,
    boundary_scalings,
    ddim_grid,
    ddim_step,
    guidance_scale_embedding,
    lcm_timesteps,
    predicted_eps,
    predicted_x0,
)

# images [B,3,H,W] in [0,1] (or, for a latent proxy RM, VAE latents [B,C,h,w]), prompts -> [B]
RewardFn = Callable[[Tensor, Sequence[str]], Tensor]
# ẑ_0, the one-step prediction or a sample (scaled latents [B,C,h,w]) -> what the reward reads (models.reward_input)
RewardInput = Callable[[Tensor], Tensor]
# A diffusers UNet2DConditionModel, or a LoRA run's view of one (rglcd.lora.AdapterView, AdaptersOff): called as the
# UNet is, returning an output with ``.sample``.
UNet = Callable[..., Any]


@dataclass(frozen=True)
class Distillation:
    """The fixed hyper-parameters of latent consistency distillation."""

    schedule: NoiseSchedule
    num_ddim_timesteps: int = 50
    w_min: float = 5.0  # LCM convention: x̂0 = cond + w·(cond − uncond)
    w_max: float = 15.0
    distance: ConsistencyDistance = field(default_factory=ConsistencyDistance)
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    time_cond_proj_dim: int = 256  # the student's guidance embedding; 0 for a LoRA student, which has none

    grid: Tensor = field(init=False, repr=False)  # [N] t_1..t_N, on the schedule's device

    def __post_init__(self) -> None:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        device = self.schedule.alphas_cumprod.device
        grid = ddim_grid(self.schedule.num_train_timesteps, self.num_ddim_timesteps, device)
        object.__setattr__(self, "grid", grid)  # built once where ᾱ is, not per step

    def to(self, device: torch.device | str) -> Distillation:
        """The distillation with its schedule and grid on ``device`` (the step's), so a step copies neither."""
        return dataclasses.replace(self, schedule=self.schedule.to(device))

    @property
    def skip(self) -> int:
        return self.schedule.num_train_timesteps // self.num_ddim_timesteps

    def sampling_timesteps(self, num_steps: int) -> Tensor:
        """τ_1 > … > τ_K: the timesteps the exported student samples ``num_steps`` steps with (its LCMScheduler's)."""
        return lcm_timesteps(self.grid, num_steps)


@dataclass(frozen=True)
class SamplerReward:
    """``reward.target: sample`` (beyond the paper): the reward reads the student's own K-step latent consistency
    sample from fresh noise instead of its one-step prediction. The graph is kept through the last ``grad_steps``
    sampling steps only; the earlier ones run without gradients (truncated backpropagation, as DRaFT-K)."""

    timesteps: Tensor  # [K] τ_1 > … > τ_K, Distillation.sampling_timesteps(K)
    grad_steps: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.grad_steps <= len(self.timesteps):
            raise ValueError(f"grad_steps must be in [1, {len(self.timesteps)}], got {self.grad_steps}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclass
class StepNoise:
    """The step's randomness: ε [B,C,h,w], DDIM-grid indices n [B] in [0, N), guidance scales w [B], and for a
    :class:`SamplerReward` the sampler's noise [K,B,C,h,w]: z_{τ_1}, then the ε that re-noises step k's estimate
    to τ_{k+1}."""

    noise: Tensor
    indices: Tensor
    guidance: Tensor
    sampler_noise: Tensor | None = None

    @classmethod
    def draw(
        cls, latents: Tensor, distillation: Distillation, generator: torch.Generator, sampler_steps: int = 0
    ) -> StepNoise:
        """Draw from a (CPU) generator, then move to the latents' device, so runs repeat on any device. The sampler's
        noise (``sampler_steps`` > 0) is drawn last: the other draws are those of a step without it."""
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        indices = torch.randint(0, distillation.num_ddim_timesteps, (batch,), generator=generator)
        uniform = torch.rand(batch, generator=generator, dtype=torch.float32)
        guidance = distillation.w_min + (distillation.w_max - distillation.w_min) * uniform
        device, sampler_noise = latents.device, None
        if sampler_steps:
            sampler_noise = torch.randn((sampler_steps, *latents.shape), generator=generator, dtype=torch.float32)
            sampler_noise = host_to_device(sampler_noise, device)
        return cls(*(host_to_device(drawn, device) for drawn in (noise, indices, guidance)), sampler_noise)


@dataclass
class StepOutput:
    loss: Tensor  # scalar: distill_loss − β·mean(reward); what the optimizer minimises
    distill_loss: Tensor  # scalar: mean over the batch of d(model_pred, target)
    reward: Tensor | None  # [B] reward of the one-step prediction, or of the sample (None when β = 0)
    model_pred: Tensor  # [B,C,h,w] f_θ(z_{t_{n+k}}, w, c, t_{n+k}), differentiable
    target: Tensor  # [B,C,h,w] f_θ⁻(ẑ_{t_n}, w, c, t_n), no grad
    sample: Tensor | None = None  # [B,C,h,w] the student's K-step sample the reward read (SamplerReward), else None

    @property
    def scored(self) -> Tensor:
        """The latents [B,C,h,w] the reward reads: the sample, else the one-step prediction (Alg. 4 fits its proxy
        on them)."""
        return self.model_pred if self.sample is None else self.sample


def consistency_function(
    unet: UNet,
    z_t: Tensor,
    timesteps: Tensor,
    w_embedding: Tensor | None,
    prompt_embeds: Tensor,
    distillation: Distillation,
    added_cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """f(z_t, w, c, t) = c_skip(t)·z_t + c_out(t)·x̂0(UNet(z_t, t, c, emb(w))): the LCM parameterisation.

    ``added_cond``: SDXL's pooled text embedding and size conditioning (``added_cond_kwargs``), else None.
    """
    schedule = distillation.schedule
    output = unet(
        z_t, timesteps, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding, added_cond_kwargs=added_cond
    ).sample.to(z_t.dtype)
    alpha, sigma = schedule.alpha_sigma(timesteps, z_t.ndim)
    x0 = predicted_x0(output, z_t, alpha, sigma, schedule.prediction_type)
    c_skip, c_out = boundary_scalings(timesteps, distillation.sigma_data, distillation.timestep_scaling)
    c_skip, c_out = (c.view(-1, *([1] * (z_t.ndim - 1))) for c in (c_skip, c_out))
    return c_skip * z_t + c_out * x0


def consistency_sample(
    unet: UNet,
    sampler: SamplerReward,
    sampler_noise: Tensor,
    w_embedding: Tensor | None,
    prompt_embeds: Tensor,
    distillation: Distillation,
    added_cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """Multistep latent consistency sampling (LCM Alg. 2 / RG-LCD Alg. 2) from z_{τ_1} = ``sampler_noise[0]``:
    ẑ_0 = f(z_{τ_k}, w, c, τ_k), then z_{τ_{k+1}} = α_{τ_{k+1}}·ẑ_0 + σ_{τ_{k+1}}·``sampler_noise[k]``; returns the
    last ẑ_0 [B,C,h,w], differentiable through the last ``sampler.grad_steps`` steps only."""
    z = sampler_noise[0]
    batch, num_steps = z.shape[0], sampler.num_steps
    timesteps = sampler.timesteps.to(z.device)
    for k in range(num_steps):
        keep_graph = torch.is_grad_enabled() and k >= num_steps - sampler.grad_steps
        with torch.set_grad_enabled(keep_graph):
            denoised = consistency_function(
                unet, z, timesteps[k].expand(batch), w_embedding, prompt_embeds, distillation, added_cond
            )
        if k + 1 < num_steps:
            alpha, sigma = distillation.schedule.alpha_sigma(timesteps[k + 1].expand(batch), z.ndim)
            z = alpha * denoised + sigma * sampler_noise[k + 1]
    return denoised


@torch.no_grad()
def teacher_ddim_cfg_step(
    teacher_unet: UNet,
    z_t: Tensor,
    indices: Tensor,
    guidance: Tensor,
    cond_embeds: Tensor,
    uncond_embeds: Tensor,
    distillation: Distillation,
    added_cond: dict[str, Tensor] | None = None,
    uncond_added_cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """ẑ_{t_n}: one DDIM step of the teacher's CFG-guided PF-ODE from z_{t_{n+k}} (LCM's augmented ODE)."""
    schedule = distillation.schedule
    start = distillation.grid.to(indices.device)[indices]  # (no copy: Distillation.to put it there)
    previous = (start - distillation.skip).clamp(min=0)
    dtype = next(teacher_unet.parameters()).dtype
    # One batched pass for cond and uncond: [2B, C, h, w].
    both_added = None
    if added_cond is not None:  # SDXL: the pooled embedding and size conditioning of each half
        both_added = {key: torch.cat([added_cond[key], uncond_added_cond[key]]).to(dtype) for key in added_cond}
    output = teacher_unet(
        torch.cat([z_t, z_t]).to(dtype),
        torch.cat([start, start]),
        encoder_hidden_states=torch.cat([cond_embeds, uncond_embeds]).to(dtype),
        added_cond_kwargs=both_added,
    ).sample.to(z_t.dtype)
    alpha, sigma = schedule.alpha_sigma(torch.cat([start, start]), z_t.ndim)
    z_pair = torch.cat([z_t, z_t])
    cond_x0, uncond_x0 = predicted_x0(output, z_pair, alpha, sigma, schedule.prediction_type).chunk(2)
    cond_eps, uncond_eps = predicted_eps(output, z_pair, alpha, sigma, schedule.prediction_type).chunk(2)
    w = guidance.view(-1, *([1] * (z_t.ndim - 1)))
    x0 = cond_x0 + w * (cond_x0 - uncond_x0)
    eps = cond_eps + w * (cond_eps - uncond_eps)
    alpha_prev, sigma_prev = schedule.alpha_sigma(previous, z_t.ndim)
    return ddim_step(x0, eps, alpha_prev, sigma_prev)


def rglcd_step(
    *,
    student: nn.Module,
    target: UNet,
    teacher_unet: UNet,
    distillation: Distillation,
    latents: Tensor,
    cond_embeds: Tensor,
    uncond_embeds: Tensor,
    noise: StepNoise,
    prompts: Sequence[str] = (),
    reward_fn: RewardFn | None = None,
    reward_beta: float = 0.0,
    reward_input: RewardInput | None = None,
    added_cond: dict[str, Tensor] | None = None,
    uncond_added_cond: dict[str, Tensor] | None = None,
    sampler: SamplerReward | None = None,
) -> StepOutput:
    """The RG-LCD loss for one batch of clean latents z [B,C,h,w] (already × VAE scaling factor).

    ``cond_embeds`` / ``uncond_embeds`` are the text embeddings [B,L,D] of the captions and of the empty
    prompt. With ``reward_beta`` = 0 (or no reward) this is exactly the LCD loss. The reward scores
    ``reward_input(model_pred)``: the decoded one-step image (Alg. 3) or, for Alg. 4's latent proxy RM, the
    unscaled latent itself.
    ``added_cond`` / ``uncond_added_cond``: SDXL's added conditions of the captions and of the empty prompt.
    With a ``sampler`` the reward reads the student's K-step sample from ``noise.sampler_noise`` instead.
    """
    rewarded = reward_fn is not None and reward_beta != 0
    if reward_beta != 0 and (reward_fn is None or reward_input is None):
        raise ValueError("reward_beta is non-zero but no reward_fn and reward_input were given")
    if rewarded and sampler is not None and noise.sampler_noise is None:
        raise ValueError("a sampler reward needs the sampler's noise: StepNoise.draw(..., sampler_steps=K)")
    schedule = distillation.schedule
    start = distillation.grid.to(noise.indices.device)[noise.indices]  # t_{n+k} (no copy after Distillation.to)
    previous = (start - distillation.skip).clamp(min=0)  # t_n
    # The step works in the noise's dtype (float32 in training; float64 in the exactness tests).
    z_start = schedule.add_noise(latents.to(noise.noise.dtype), noise.noise, start)
    # A LoRA student has no guidance input (time_cond_proj_dim 0): w acts only through the teacher's CFG.
    w_embedding = None
    if distillation.time_cond_proj_dim:
        w_embedding = guidance_scale_embedding(noise.guidance, distillation.time_cond_proj_dim).to(z_start)
    model_pred = consistency_function(student, z_start, start, w_embedding, cond_embeds, distillation, added_cond)

    z_previous = teacher_ddim_cfg_step(
        teacher_unet, z_start, noise.indices, noise.guidance, cond_embeds, uncond_embeds, distillation,
        added_cond, uncond_added_cond,
    )  # fmt: skip
    with torch.no_grad():
        target_pred = consistency_function(
            target, z_previous, previous, w_embedding, cond_embeds, distillation, added_cond
        )

    distill_loss = distillation.distance(model_pred, target_pred).mean()
    reward, sample = None, None
    loss = distill_loss
    if rewarded:
        # RG-LCD: the reward of the one-step image; its gradient reaches θ through the frozen VAE decoder.
        scored = model_pred
        if sampler is not None:  # beyond the paper: the reward of what users sample, with the step's w
            scored = sample = consistency_sample(
                student, sampler, noise.sampler_noise, w_embedding, cond_embeds, distillation, added_cond
            )
        reward = reward_fn(reward_input(scored), list(prompts))
        loss = distill_loss - reward_beta * reward.mean()
    return StepOutput(loss, distill_loss.detach(), reward, model_pred, target_pred, sample)
