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
from .matching import dmd_gradient, dmd_loss, fake_prediction, generator_gan_loss
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
class SampleTarget:
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


@dataclass(frozen=True)
class MatchingTerms:
    """Beyond RG-LCD: DMD's distribution-matching term and DMD2's adversarial term (:mod:`rglcd.matching`), read on
    the student's own K-step latent consistency sample from pure noise (``generator``) at the step's w. The fake score
    network ``fake_unet`` (and the discriminator ``head`` on its mid-block) is frozen in the step; it is fitted to the
    samples after the student's update (:mod:`rglcd.train.fake_score`)."""

    fake_unet: UNet
    generator: SampleTarget  # K = dmd.student_steps; the graph through the last step only (truncated, as DRaFT-1)
    dmd_weight: float
    dmd_timesteps: tuple[int, int]  # DMD's t ~ U{lo, …, hi} (DMD2: 2 % to 98 % of T)
    real_guidance: float | None = None  # diffusers' CFG scale of the teacher's x̂0; None: the step's w + 1
    gan_weight: float = 0.0
    head: nn.Module | None = None  # the discriminator on the fake network's bottleneck (gan_weight > 0)
    gan_timesteps: int = 1  # the GAN's noise level t ~ U{0, …, gan_timesteps − 1}


@dataclass
class MatchingNoise:
    """The randomness of :class:`MatchingTerms`: the generator's noise [K,B,C,h,w] (z_{τ_1}, then the re-noising
    ε of each step), DMD's t [B] and ε [B,C,h,w], the GAN's t [B] and ε [B,C,h,w]."""

    generator_noise: Tensor
    dmd_timesteps: Tensor
    dmd_noise: Tensor
    gan_timesteps: Tensor
    gan_noise: Tensor

    @classmethod
    def draw(cls, latents: Tensor, terms: MatchingTerms, generator: torch.Generator) -> MatchingNoise:
        """Drawn from the (CPU) generator after the step's own draws, so a run without the terms repeats exactly."""
        batch, shape = latents.shape[0], latents.shape
        generator_noise = torch.randn((terms.generator.num_steps, *shape), generator=generator)
        low, high = terms.dmd_timesteps
        dmd_timesteps = torch.randint(low, high + 1, (batch,), generator=generator)
        dmd_noise = torch.randn(shape, generator=generator)
        gan_timesteps = torch.randint(0, terms.gan_timesteps, (batch,), generator=generator)
        gan_noise = torch.randn(shape, generator=generator)
        drawn = (generator_noise, dmd_timesteps, dmd_noise, gan_timesteps, gan_noise)
        return cls(*(host_to_device(tensor, latents.device) for tensor in drawn))


@dataclass
class StepNoise:
    """The step's randomness: ε [B,C,h,w], DDIM-grid indices n [B] in [0, N), guidance scales w [B], and for a
    :class:`SampleTarget` the sample's noise [K,B,C,h,w]: z_{τ_1}, then the ε that re-noises step k's estimate
    to τ_{k+1}."""

    noise: Tensor
    indices: Tensor
    guidance: Tensor
    sample_noise: Tensor | None = None
    matching: MatchingNoise | None = None  # drawn last, by MatchingNoise.draw, for a step with MatchingTerms

    @classmethod
    def draw(
        cls, latents: Tensor, distillation: Distillation, generator: torch.Generator, sample_steps: int = 0
    ) -> StepNoise:
        """Draw from a (CPU) generator, then move to the latents' device, so runs repeat on any device. The sample's
        noise (``sample_steps`` > 0) is drawn last: the other draws are those of a step without it."""
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        indices = torch.randint(0, distillation.num_ddim_timesteps, (batch,), generator=generator)
        uniform = torch.rand(batch, generator=generator, dtype=torch.float32)
        guidance = distillation.w_min + (distillation.w_max - distillation.w_min) * uniform
        device, sample_noise = latents.device, None
        if sample_steps:
            sample_noise = torch.randn((sample_steps, *latents.shape), generator=generator, dtype=torch.float32)
            sample_noise = host_to_device(sample_noise, device)
        return cls(*(host_to_device(drawn, device) for drawn in (noise, indices, guidance)), sample_noise)


@dataclass(frozen=True)
class StepReward:
    """The reward term of the step's loss, −mean_b R(reader(x_b), c_b) (Alg. 3; Alg. 4 with the frozen proxy as R).

    ``fn`` is R already weighted by the configured β's: Σ_i β_i·r_i for the expert terms (``reward.terms[i].beta``,
    applied by :class:`~rglcd.rewards.mix.Mix`), or β·proxy for Alg. 4 (``reward.latent.beta``). ``reader`` turns the
    scored latents into what R reads (decoded images, or unscaled latents for a latent proxy). With a ``sample_target``
    R scores the student's own K-step sample instead of its one-step prediction.
    """

    fn: RewardFn
    reader: RewardInput
    sample_target: SampleTarget | None = None


@dataclass
class StepOutput:
    loss: Tensor  # scalar: Σ of the terms; what the optimizer minimises
    terms: dict[str, Tensor]  # name -> scalar weighted term (detached): consistency, reward; logged as loss/<name>
    distill_loss: Tensor  # scalar (detached): mean over the batch of d(model_pred, target), unweighted
    reward: Tensor | None  # [B] the β-weighted reward of the one-step prediction or of the sample (None: no term)
    model_pred: Tensor  # [B,C,h,w] f_θ(z_{t_{n+k}}, w, c, t_{n+k}), differentiable
    target: Tensor  # [B,C,h,w] f_θ⁻(ẑ_{t_n}, w, c, t_n), no grad
    sample: Tensor | None = None  # [B,C,h,w] the student's K-step sample the reward read (SampleTarget), else None
    generated: Tensor | None = None  # [B,C,h,w] the student's sample from noise the matching terms read (detached)

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
    sample_target: SampleTarget,
    sample_noise: Tensor,
    w_embedding: Tensor | None,
    prompt_embeds: Tensor,
    distillation: Distillation,
    added_cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """Multistep latent consistency sampling (LCM Alg. 2 / RG-LCD Alg. 2) from z_{τ_1} = ``sample_noise[0]``:
    ẑ_0 = f(z_{τ_k}, w, c, τ_k), then z_{τ_{k+1}} = α_{τ_{k+1}}·ẑ_0 + σ_{τ_{k+1}}·``sample_noise[k]``; returns the
    last ẑ_0 [B,C,h,w], differentiable through the last ``sample_target.grad_steps`` steps only."""
    z = sample_noise[0]
    batch, num_steps = z.shape[0], sample_target.num_steps
    timesteps = sample_target.timesteps.to(z.device)
    for k in range(num_steps):
        keep_graph = torch.is_grad_enabled() and k >= num_steps - sample_target.grad_steps
        with torch.set_grad_enabled(keep_graph):
            denoised = consistency_function(
                unet, z, timesteps[k].expand(batch), w_embedding, prompt_embeds, distillation, added_cond
            )
        if k + 1 < num_steps:
            alpha, sigma = distillation.schedule.alpha_sigma(timesteps[k + 1].expand(batch), z.ndim)
            z = alpha * denoised + sigma * sample_noise[k + 1]
    return denoised


@torch.no_grad()
def teacher_cfg_prediction(
    teacher_unet: UNet,
    z_t: Tensor,
    timesteps: Tensor,
    guidance: Tensor,
    cond_embeds: Tensor,
    uncond_embeds: Tensor,
    schedule: NoiseSchedule,
    added_cond: dict[str, Tensor] | None = None,
    uncond_added_cond: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The teacher's CFG estimates (x̂0, ε̂) [B,C,h,w] at z_t, with LCM's convention x̂ = cond + w·(cond − uncond)
    (w = diffusers' guidance_scale − 1), from one batched pass over cond and uncond."""
    dtype = next(teacher_unet.parameters()).dtype
    # One batched pass for cond and uncond: [2B, C, h, w].
    both_added = None
    if added_cond is not None:  # SDXL: the pooled embedding and size conditioning of each half
        both_added = {key: torch.cat([added_cond[key], uncond_added_cond[key]]).to(dtype) for key in added_cond}
    output = teacher_unet(
        torch.cat([z_t, z_t]).to(dtype),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([cond_embeds, uncond_embeds]).to(dtype),
        added_cond_kwargs=both_added,
    ).sample.to(z_t.dtype)
    alpha, sigma = schedule.alpha_sigma(torch.cat([timesteps, timesteps]), z_t.ndim)
    z_pair = torch.cat([z_t, z_t])
    cond_x0, uncond_x0 = predicted_x0(output, z_pair, alpha, sigma, schedule.prediction_type).chunk(2)
    cond_eps, uncond_eps = predicted_eps(output, z_pair, alpha, sigma, schedule.prediction_type).chunk(2)
    w = guidance.view(-1, *([1] * (z_t.ndim - 1)))
    return cond_x0 + w * (cond_x0 - uncond_x0), cond_eps + w * (cond_eps - uncond_eps)


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
    x0, eps = teacher_cfg_prediction(
        teacher_unet, z_t, start, guidance, cond_embeds, uncond_embeds, schedule, added_cond, uncond_added_cond
    )
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
    reward: StepReward | None = None,
    consistency_weight: float = 1.0,
    matching: MatchingTerms | None = None,
    added_cond: dict[str, Tensor] | None = None,
    uncond_added_cond: dict[str, Tensor] | None = None,
) -> StepOutput:
    """The RG-LCD loss for one batch of clean latents z [B,C,h,w] (already × VAE scaling factor):
    λ·mean_b d(f_θ(z_{t_{n+k}}), f_θ⁻(ẑ_{t_n})) − mean_b R(x_b), a sum of named terms (``StepOutput.terms``).

    ``cond_embeds`` / ``uncond_embeds`` are the text embeddings [B,L,D] of the captions and of the empty
    prompt. λ is ``consistency_weight`` (``distill.lcd_weight``). Without a ``reward`` this is exactly the LCD loss.
    ``added_cond`` / ``uncond_added_cond``: SDXL's added conditions of the captions and of the empty prompt.
    A reward with a ``sample_target`` reads the student's K-step sample from ``noise.sample_noise``. ``matching``
    adds DMD's and DMD2's GAN terms (named ``dmd`` and ``gan``), with their noise in ``noise.matching``.
    """
    sampled = reward is not None and reward.sample_target is not None
    if sampled and noise.sample_noise is None:
        raise ValueError("a reward on the sample needs the sample's noise: StepNoise.draw(..., sample_steps=K)")
    if matching is not None and noise.matching is None:
        raise ValueError("the matching terms need their noise: StepNoise.matching = MatchingNoise.draw(...)")
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

    # The consistency term (LCD, Luo et al. 2023, Alg. 1).
    distill_loss = distillation.distance(model_pred, target_pred).mean()
    terms = {"consistency": consistency_weight * distill_loss}
    rewards, sample = None, None
    if reward is not None:
        # RG-LCD: the reward of the one-step image; its gradient reaches θ through the frozen VAE decoder.
        scored = model_pred
        if sampled:  # beyond the paper: the reward of what users sample, with the step's w
            scored = sample = consistency_sample(
                student, reward.sample_target, noise.sample_noise, w_embedding, cond_embeds, distillation, added_cond
            )
        rewards = reward.fn(reward.reader(scored), list(prompts))
        terms["reward"] = -rewards.mean()
    generated = None
    if matching is not None:
        generated = consistency_sample(
            student, matching.generator, noise.matching.generator_noise, w_embedding, cond_embeds, distillation,
            added_cond,
        )  # fmt: skip
        terms.update(
            matching_terms(
                matching, generated, noise, teacher_unet, cond_embeds, uncond_embeds, distillation, added_cond,
                uncond_added_cond,
            )
        )  # fmt: skip
        generated = generated.detach()
    loss = sum(terms.values())
    logged = {name: term.detach() for name, term in terms.items()}
    return StepOutput(loss, logged, distill_loss.detach(), rewards, model_pred, target_pred, sample, generated)


def matching_terms(
    matching: MatchingTerms,
    generated: Tensor,
    noise: StepNoise,
    teacher_unet: UNet,
    cond_embeds: Tensor,
    uncond_embeds: Tensor,
    distillation: Distillation,
    added_cond: dict[str, Tensor] | None = None,
    uncond_added_cond: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The weighted ``dmd`` and ``gan`` terms of the student's sample x = ``generated`` [B,C,h,w] (differentiable)."""
    schedule, drawn, terms = distillation.schedule, noise.matching, {}
    if matching.dmd_weight:
        # DMD: the teacher's (real) and the fake network's x̂0 at z_t = α_t·x + σ_t·ε, t ~ U[t_min, t_max].
        timesteps = drawn.dmd_timesteps
        z_t = schedule.add_noise(generated.detach(), drawn.dmd_noise.to(generated.dtype), timesteps)
        guidance = noise.guidance  # LCM's w = diffusers' scale − 1
        if matching.real_guidance is not None:
            guidance = torch.full_like(noise.guidance, matching.real_guidance - 1.0)
        real_x0, _ = teacher_cfg_prediction(
            teacher_unet, z_t, timesteps, guidance, cond_embeds, uncond_embeds, schedule, added_cond,
            uncond_added_cond,
        )  # fmt: skip
        with torch.no_grad():
            fake_x0, _ = fake_prediction(matching.fake_unet, z_t, timesteps, cond_embeds, schedule, added_cond)
        grad = dmd_gradient(generated.detach(), real_x0, fake_x0)
        terms["dmd"] = matching.dmd_weight * dmd_loss(generated, grad)
    if matching.gan_weight:
        # DMD2's GAN: the discriminator's logit of the noised sample; its gradient reaches θ through the (frozen)
        # fake network's encoder.
        z_t = schedule.add_noise(generated, drawn.gan_noise.to(generated.dtype), drawn.gan_timesteps)
        _, logits = fake_prediction(
            matching.fake_unet, z_t, drawn.gan_timesteps, cond_embeds, schedule, added_cond, matching.head
        )
        terms["gan"] = matching.gan_weight * generator_gan_loss(logits)
    return terms
