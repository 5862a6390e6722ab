"""Distribution matching and the adversarial term as pure math (no I/O): DMD (Yin et al. 2023, "One-step
Diffusion with Distribution Matching Distillation"), DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis").

DMD moves a generator's samples x along the difference of two scores at a random noise level t: the teacher's
("real", with CFG) and a "fake" score network fitted online to the generator's own samples. In x̂_0 form, with
z_t = α_t·x + σ_t·ε, the gradient is ∇ = (x̂_0^fake − x̂_0^real) / mean|x − x̂_0^real| (the mean per sample: DMD's
normaliser), applied as the stop-gradient regression ½·mean(x − sg(x − ∇))², whose gradient is ∇ / numel.
DMD2's adversarial term: a small head on the fake network's mid-block features tells noised data from noised
samples; non-saturating losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schedules import NoiseSchedule, predicted_x0


def denoising_target(z0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """What a network of ``prediction_type`` regresses at z_t = α·z0 + σ·ε: ε, v = α·ε − σ·z0 (Salimans & Ho
    2022), or z0 itself."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * z0
    if prediction_type == "sample":
        return z0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def dmd_gradient(sample: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's generator gradient [B,C,h,w] at the samples x: (x̂_0^fake − x̂_0^real) / mean_{C,h,w}|x − x̂_0^real|
    (DMD Eq. 7–8; DMD2's code form: (p_real − p_fake) / mean|p_real| with p = x − x̂_0). No graph."""
    with torch.no_grad():
        p_real, p_fake = sample - real_x0, sample - fake_x0
        grad = (p_real - p_fake) / p_real.abs().mean(dim=tuple(range(1, sample.ndim)), keepdim=True)
        # A sample the teacher reconstructs exactly has no normaliser (x/0): no gradient, where DMD2's nan_to_num
        # would push it by ±3.4e38.
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(sample: Tensor, grad: Tensor) -> Tensor:
    """½·mean((x − sg(x − ∇))²): a scalar whose gradient with respect to x is ∇ / x.numel()."""
    dtype = torch.promote_types(sample.dtype, torch.float32)  # at least float32 under autocast
    return 0.5 * F.mse_loss(sample.to(dtype), (sample - grad).detach().to(dtype))


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating loss: mean softplus(−D(x)) = −mean log sigmoid(D(x)) (Goodfellow et al.)."""
    return F.softplus(-fake_logits).mean()


def discriminator_gan_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's loss: mean softplus(D(fake)) + mean softplus(−D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The share of real (logit > 0) and generated (logit < 0) latents the head tells right: a scalar in [0, 1]."""
    right = torch.cat([real_logits > 0, fake_logits < 0])
    return right.float().mean()


class DiscriminatorHead(nn.Module):
    """DMD2's classifier on the fake score network's bottleneck: a few convolutions with GroupNorm and SiLU, then
    (here, for any bottleneck size) a global average and a linear layer to one logit per sample."""

    def __init__(self, channels: int, depth: int = 2):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.logit = nn.Linear(channels, 1)

    def forward(self, features: Tensor) -> Tensor:  # [B, channels, h, w] -> [B]
        return self.logit(self.convs(features.to(self.logit.weight.dtype)).mean(dim=(2, 3))).squeeze(1)


@contextlib.contextmanager
def mid_block_features(unet: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every forward of ``unet`` appends its mid-block output [B, C, h, w] to the yielded list."""
    found: list[Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: found.append(output))
    try:
        yield found
    finally:
        handle.remove()


def unet_output(
    unet: nn.Module, z_t: Tensor, timesteps: Tensor, cond_embeds: Tensor, added_cond: dict[str, Tensor] | None
) -> Tensor:
    """The UNet's raw output at z_t, its inputs cast to the UNet's dtype (a LoRA fake network's frozen base may be
    half precision)."""
    dtype = next(unet.parameters()).dtype
    if added_cond is not None:
        added_cond = {key: value.to(dtype) for key, value in added_cond.items()}
    return unet(
        z_t.to(dtype), timesteps, encoder_hidden_states=cond_embeds.to(dtype), added_cond_kwargs=added_cond
    ).sample


def fake_prediction(
    fake_unet: nn.Module,
    z_t: Tensor,
    timesteps: Tensor,
    cond_embeds: Tensor,
    schedule: NoiseSchedule,
    added_cond: dict[str, Tensor] | None = None,
    head: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The fake score network's x̂0 [B,C,h,w] at z_t, conditional only (DMD2's fake guidance is 1), and with a
    discriminator ``head`` its logits [B] on the network's mid-block features (else None)."""
    watch = mid_block_features(fake_unet) if head is not None else contextlib.nullcontext([])
    with watch as features:
        output = unet_output(fake_unet, z_t, timesteps, cond_embeds, added_cond).to(z_t.dtype)
    alpha, sigma = schedule.alpha_sigma(timesteps, z_t.ndim)
    x0 = predicted_x0(output, z_t, alpha, sigma, schedule.prediction_type)
    return x0, head(features[-1]) if head is not None else None


def fake_score_loss(
    fake_unet: nn.Module,
    samples: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    cond_embeds: Tensor,
    schedule: NoiseSchedule,
    added_cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """The fake network's denoising loss on the generator's (detached) samples [B,C,h,w] at t [B]: the mean squared
    error of its output against the target of its parameterisation (DMD2: ε for an ε-teacher), a scalar."""
    samples = samples.detach()
    z_t = schedule.add_noise(samples, noise, timesteps)
    output = unet_output(fake_unet, z_t, timesteps, cond_embeds, added_cond)
    alpha, sigma = schedule.alpha_sigma(timesteps, samples.ndim)
    target = denoising_target(samples, noise, alpha, sigma, schedule.prediction_type)
    dtype = torch.promote_types(samples.dtype, torch.float32)  # at least float32 under autocast
    return F.mse_loss(output.to(dtype), target.to(dtype))


def discriminator_loss(
    fake_unet: nn.Module,
    head: nn.Module,
    data: Tensor,
    samples: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    cond_embeds: Tensor,
    schedule: NoiseSchedule,
    added_cond: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The discriminator's loss (scalar) and accuracy on noised data latents vs noised (detached) samples, both
    [B,C,h,w], noised with ``noise`` [2B,C,h,w] at ``timesteps`` [2B] (data first), in one pass of 2B."""
    both = torch.cat([data.detach(), samples.detach()])
    z_t = schedule.add_noise(both, noise, timesteps)
    cond = torch.cat([cond_embeds, cond_embeds])
    added = None if added_cond is None else {key: torch.cat([value, value]) for key, value in added_cond.items()}
    _, logits = fake_prediction(fake_unet, z_t, timesteps, cond, schedule, added, head)
    real_logits, fake_logits = logits.chunk(2)
    return discriminator_gan_loss(real_logits, fake_logits), discriminator_accuracy(real_logits, fake_logits)
