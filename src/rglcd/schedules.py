"""Pure schedule math for latent consistency distillation (no I/O, no models).

Conventions follow the LCM paper (Luo et al. 2023) and RG-LCD (Li et al. 2024): a DDPM teacher with
``alphas_cumprod`` over T training timesteps, a DDIM skipping grid of N timesteps (skip k = T // N),
LCM boundary scalings and the guidance-scale (w) Fourier embedding used as ``timestep_cond``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim_grid(
    num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50, device: torch.device | str = "cpu"
) -> Tensor:
    """The DDIM solver grid t_1..t_N = k·n − 1 (k = T // N): [19, 39, ..., 999] for T=1000, N=50."""
    if not 0 < num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    skip = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long, device=device) * skip - 1


def lcm_timesteps(grid: Tensor, num_steps: int) -> Tensor:
    """The K = ``num_steps`` sampling timesteps of a consistency model distilled on ``grid``, as diffusers'
    LCMScheduler picks them: the grid from its end, at indices ⌊i·N/K⌋ ([999, 499] for K = 2 on the N = 50 grid)."""
    if not 0 < num_steps <= len(grid):
        raise ValueError(f"num_steps must be in [1, {len(grid)}] (the grid's size), got {num_steps}")
    return grid.flip(0)[torch.arange(num_steps) * len(grid) // num_steps]


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """β_t exactly as diffusers' DDPM/DDIM/PNDM/LCM schedulers build them (float32)."""
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("teachers with rescale_betas_zero_snr=True are not supported")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":  # Stable Diffusion's schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, β capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = range(num_train_timesteps)
        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999) for i in steps
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule {schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True)
class NoiseSchedule:
    """The teacher's forward process z_t = α_t·z_0 + σ_t·ε, with α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t)."""

    alphas_cumprod: Tensor  # [T]
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From any diffusers scheduler config (a dict or ``scheduler.config``)."""
        alphas_cumprod = torch.cumprod(1.0 - betas_from_config(config), dim=0)
        return cls(alphas_cumprod, config.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The schedule with ᾱ on ``device``, once: indexing it there needs no copy per step (a host sync on a GPU)."""
        return dataclasses.replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

    def alpha_sigma(self, timesteps: Tensor, ndim: int = 4) -> tuple[Tensor, Tensor]:
        """α_t, σ_t for a batch of integer timesteps, shaped [B, 1, ..., 1] to broadcast over latents."""
        alphas_cumprod = self.alphas_cumprod.to(timesteps.device)[timesteps]  # no copy once on their device (.to)
        shape = (-1,) + (1,) * (ndim - 1)
        return alphas_cumprod.sqrt().view(shape), (1 - alphas_cumprod).sqrt().view(shape)

    def add_noise(self, z0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(timesteps, z0.ndim)
        return alpha * z0 + sigma * noise


def predicted_x0(model_output: Tensor, sample: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x̂_0 from a network output of the given parameterisation at z_t = ``sample``."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":  # v = α·ε − σ·x0  (Salimans & Ho 2022)
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_eps(model_output: Tensor, sample: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """ε̂ from a network output of the given parameterisation at z_t = ``sample``."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def boundary_scalings(
    timesteps: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """LCM's c_skip(t), c_out(t) (Luo et al. 2023, eq. 5 with t scaled by ``timestep_scaling``).

    c_skip(0) = 1 and c_out(0) = 0, so f(z, 0) = z: the consistency boundary condition.
    """
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_scale_embedding(w: Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the guidance scale (VDM-style, w scaled by 1000): [B] -> [B, embedding_dim].

    Same function diffusers' LatentConsistencyModelPipeline feeds to the UNet's ``timestep_cond``.
    """
    w = w.flatten() * 1000.0
    half_dim = embedding_dim // 2
    frequencies = torch.exp(
        torch.arange(half_dim, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half_dim - 1))
    )
    angles = w.to(dtype)[:, None] * frequencies[None, :]  # [B, half_dim]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def ddim_step(x0: Tensor, eps: Tensor, alpha_prev: Tensor, sigma_prev: Tensor) -> Tensor:
    """One deterministic DDIM step (η = 0) to the previous grid point: α_{t_n}·x̂0 + σ_{t_n}·ε̂."""
    return alpha_prev * x0 + sigma_prev * eps
