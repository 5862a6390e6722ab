import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from rglcd.schedules import (
    NoiseSchedule,
    betas_from_config,
    boundary_scalings,
    ddim_grid,
    ddim_step,
    guidance_scale_embedding,
    lcm_timesteps,
    predicted_eps,
    predicted_x0,
)

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def test_ddim_grid_is_k_n_minus_one():
    grid = ddim_grid(1000, 50)
    assert grid.tolist() == [20 * n - 1 for n in range(1, 51)]
    assert ddim_grid(1000, 4).tolist() == [249, 499, 749, 999]
    with pytest.raises(ValueError):
        ddim_grid(1000, 0)


def test_lcm_timesteps_exact_and_equal_lcm_scheduler():
    grid = ddim_grid(1000, 50)
    assert lcm_timesteps(grid, 1).tolist() == [999]
    assert lcm_timesteps(grid, 2).tolist() == [999, 499]
    assert lcm_timesteps(grid, 4).tolist() == [999, 759, 499, 259]
    for num_ddim in (50, 25):
        scheduler = LCMScheduler(**SD_BETAS, original_inference_steps=num_ddim)
        for steps in range(1, 9):
            scheduler.set_timesteps(steps)
            assert lcm_timesteps(ddim_grid(1000, num_ddim), steps).tolist() == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match="num_steps"):
        lcm_timesteps(grid, 51)


@pytest.mark.parametrize(
    "config",
    [
        SD_BETAS,
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    ],
)
def test_betas_and_alphas_equal_diffusers(config):
    scheduler = DDPMScheduler(**config)
    assert torch.equal(betas_from_config(config), scheduler.betas)
    assert torch.equal(NoiseSchedule.from_config(config).alphas_cumprod, scheduler.alphas_cumprod)


def test_scaled_linear_exact_endpoints():
    betas = betas_from_config(SD_BETAS)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    # middle of the scaled-linear schedule: ((√β0 + √β1) / 2)²
    expected_mid = ((math.sqrt(0.00085) + math.sqrt(0.012)) / 2) ** 2
    assert ((betas[499] + betas[500]) / 2).item() == pytest.approx(expected_mid, rel=1e-4)


def test_unsupported_schedules_are_clear_errors():
    with pytest.raises(ValueError, match="unsupported beta_schedule"):
        betas_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        betas_from_config({**SD_BETAS, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({**SD_BETAS, "prediction_type": "flow"})


def test_alpha_sigma_and_add_noise_match_diffusers():
    schedule = NoiseSchedule.from_config(SD_BETAS)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0, 999]))
    assert alpha.shape == (2, 1, 1, 1)
    assert alpha[0].item() == pytest.approx(math.sqrt(1 - 0.00085), rel=1e-7)
    assert (alpha**2 + sigma**2).flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    z0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    expected = DDPMScheduler(**SD_BETAS).add_noise(z0, eps, t)
    torch.testing.assert_close(schedule.add_noise(z0, eps, t), expected, atol=1e-6, rtol=0)


# Hand-made point: α = 0.6, σ = 0.8, x0 = 1, ε = 2 → z = 2.2 and v = α·ε − σ·x0 = 0.4.
ALPHA, SIGMA, X0, EPS, Z, V = 0.6, 0.8, 1.0, 2.0, 2.2, 0.4


@pytest.mark.parametrize("kind,output", [("epsilon", EPS), ("v_prediction", V), ("sample", X0)])
def test_conversions_exact_values(kind, output):
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    assert predicted_x0(t(output), t(Z), t(ALPHA), t(SIGMA), kind).item() == pytest.approx(X0, abs=1e-12)
    assert predicted_eps(t(output), t(Z), t(ALPHA), t(SIGMA), kind).item() == pytest.approx(EPS, abs=1e-12)


def test_conversions_match_diffusers_ddim_for_every_parameterisation():
    # DDPMScheduler.step's "pred_original_sample" is diffusers' x̂0 for each prediction type.
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(**SD_BETAS, prediction_type=kind, clip_sample=False)
        schedule = NoiseSchedule.from_config(scheduler.config)
        z, output = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        t = torch.tensor([700])
        alpha, sigma = schedule.alpha_sigma(t)
        expected = scheduler.step(output, 700, z).pred_original_sample
        torch.testing.assert_close(predicted_x0(output, z, alpha, sigma, kind), expected, atol=1e-5, rtol=1e-5)


def test_boundary_scalings_exact_and_match_lcm_scheduler():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1]))
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / 100.25])
    assert c_out.tolist() == pytest.approx([0.0, 10 / math.sqrt(100.25)])
    c_skip, c_out = boundary_scalings(torch.tensor([2]), sigma_data=1.0, timestep_scaling=1.0)
    assert (c_skip.item(), c_out.item()) == pytest.approx((1 / 5, 2 / math.sqrt(5)))
    lcm = LCMScheduler(**SD_BETAS)
    for t in (0, 19, 499, 999):
        ours = boundary_scalings(torch.tensor([t]))
        theirs = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert [x.item() for x in ours] == pytest.approx([float(x) for x in theirs], rel=1e-6)


def test_guidance_embedding_exact_and_matches_diffusers_pipeline():
    embedding = guidance_scale_embedding(torch.tensor([0.0, 7.5]), 8)
    assert embedding.shape == (2, 8)
    assert embedding[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # sin(0), cos(0)
    assert embedding[1, 0].item() == pytest.approx(math.sin(7500.0), abs=1e-3)
    assert embedding[1, 4].item() == pytest.approx(math.cos(7500.0), abs=1e-3)
    w = torch.tensor([5.0, 9.25, 15.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.equal(guidance_scale_embedding(w, 256), expected)
    assert guidance_scale_embedding(w, 7).shape == (3, 7)


def test_ddim_step_exact():
    result = ddim_step(torch.tensor([X0]), torch.tensor([EPS]), torch.tensor([ALPHA]), torch.tensor([SIGMA]))
    assert result.item() == pytest.approx(Z)


def test_ddim_grid_edges_defaults_and_device():
    """Both ends of N ∈ [1, T] are allowed and 0, T + 1 are not; k = T // N is an integer division (T = 1000, N = 3:
    k = 333); the defaults are T = 1000, N = 50; the grid is made where asked."""
    assert ddim_grid(1000, 1).tolist() == [999]
    assert ddim_grid(10, 10).tolist() == list(range(10))
    grid = ddim_grid(1000, 3)
    assert grid.dtype == torch.long and grid.tolist() == [332, 665, 998]
    assert ddim_grid().tolist() == [20 * n - 1 for n in range(1, 51)]
    assert ddim_grid(num_ddim_timesteps=7).tolist() == [142 * n - 1 for n in range(1, 8)]  # T = 1000 by default
    assert ddim_grid(1000, 4, "meta").device.type == "meta"
    for bad in (0, 11):
        with pytest.raises(ValueError, match=rf"^num_ddim_timesteps must be in \[1, 10\], got {bad}$"):
            ddim_grid(10, bad)


def test_lcm_timesteps_take_every_grid_point_and_refuse_zero_steps():
    """K = N samples the whole grid, from t = 999 down; K = 0 is refused (not an empty schedule)."""
    grid = ddim_grid(1000, 50)
    assert lcm_timesteps(grid, 50).tolist() == grid.flip(0).tolist()
    with pytest.raises(ValueError, match="num_steps must be in"):
        lcm_timesteps(grid, 0)


def test_betas_defaults_and_other_lengths():
    """diffusers' defaults (linear from 1e-4 to 0.02 over T = 1000) when the config leaves them out, and T read
    from the config (10 betas for num_train_timesteps = 10)."""
    betas = betas_from_config({})
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.0001, rel=1e-6) and betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    expected = [0.1 + 0.1 * i / 9 for i in range(10)]  # linspace(0.1, 0.2, 10)
    linear = {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.2, "num_train_timesteps": 10}
    assert betas_from_config(linear).tolist() == pytest.approx(expected, rel=1e-6)
    assert NoiseSchedule.from_config(linear).num_train_timesteps == 10


def test_trained_betas_are_taken_as_given_in_float32():
    """trained_betas win over the named schedule and are float32 whatever they come as (a float64 array here)."""
    betas = betas_from_config({**SD_BETAS, "trained_betas": np.array([0.1, 0.25, 0.5], dtype=np.float64)})
    assert betas.dtype == torch.float32
    assert betas.tolist() == pytest.approx([0.1, 0.25, 0.5], rel=1e-7)


@pytest.mark.parametrize(
    "config",
    [
        {"trained_betas": [0.1, 0.2]},
        {"beta_schedule": "linear"},
        SD_BETAS,
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 10},
    ],
)
def test_betas_are_float32_under_a_float64_default_dtype(config):
    """β is float32 as in diffusers' schedulers, also in a process that made float64 its default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert betas_from_config(config).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_error_messages_name_the_unsupported_setting():
    """The exact messages: the setting and the value that is refused."""
    with pytest.raises(ValueError, match=r"^teachers with rescale_betas_zero_snr=True are not supported$"):
        betas_from_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match=r"^unknown prediction_type 'flow'$"):
        predicted_x0(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), "flow")
    with pytest.raises(ValueError, match=r"^unknown prediction_type 'flow'$"):
        predicted_eps(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1), "flow")


# A second hand-made point with x0 ≠ 1 (so x·x0 and x / x0 differ): α = 0.6, σ = 0.8, x0 = 2, ε = 3
# → z = 1.2 + 2.4 = 3.6 and v = α·ε − σ·x0 = 1.8 − 1.6 = 0.2.
X0_2, EPS_2, Z_2, V_2 = 2.0, 3.0, 3.6, 0.2


@pytest.mark.parametrize("kind,output", [("epsilon", EPS_2), ("v_prediction", V_2), ("sample", X0_2)])
def test_conversions_exact_values_at_a_second_point(kind, output):
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    assert predicted_x0(t(output), t(Z_2), t(ALPHA), t(SIGMA), kind).item() == pytest.approx(X0_2, abs=1e-12)
    assert predicted_eps(t(output), t(Z_2), t(ALPHA), t(SIGMA), kind).item() == pytest.approx(EPS_2, abs=1e-12)


def test_ddim_step_exact_at_a_second_point():
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    assert ddim_step(t(X0_2), t(EPS_2), t(ALPHA), t(SIGMA)).item() == pytest.approx(Z_2, abs=1e-12)


def test_alpha_sigma_shape_follows_the_sample_and_the_device():
    """α_t, σ_t broadcast over a sample of any rank ([B, d] here: α·z0 + σ·ε stays [B, d]); ᾱ is indexed on the
    timesteps' device; NoiseSchedule.to moves ᾱ and keeps the parameterisation."""
    schedule = NoiseSchedule(torch.tensor([0.36, 0.64], dtype=torch.float64), "v_prediction")
    z0, eps = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    noisy = schedule.add_noise(z0, eps, torch.tensor([0, 1]))
    assert noisy.shape == (2, 2)
    assert noisy.flatten().tolist() == pytest.approx([0.6 + 0.8, 1.2 + 0.8, 2.4 + 0.6, 3.2 + 0.6], abs=1e-12)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([1, 0]), ndim=3)
    assert alpha.shape == sigma.shape == (2, 1, 1)
    assert alpha.flatten().tolist() == pytest.approx([0.8, 0.6])
    assert sigma.flatten().tolist() == pytest.approx([0.6, 0.8])
    alpha, _ = schedule.alpha_sigma(torch.tensor([0], device="meta"))
    assert alpha.device.type == "meta"
    moved = schedule.to("meta")
    assert moved.alphas_cumprod.device.type == "meta" and moved.prediction_type == "v_prediction"
    assert schedule.alphas_cumprod.device.type == "cpu"  # a copy: the original is unchanged


def test_guidance_embedding_defaults_dtype_and_device():
    """256 dimensions by default; the embedding is in the dtype asked for (whatever w's dtype), with the frequencies
    exp(−i·ln(10⁴)/(h − 1)) computed in it (float64 here: exact to 1e-9 at w = 7.5 · 1000); made on w's device."""
    assert guidance_scale_embedding(torch.tensor([5.0, 6.0])).shape == (2, 256)
    w64 = torch.tensor([7.5], dtype=torch.float64)
    assert guidance_scale_embedding(w64, 8).dtype == torch.float32
    embedding = guidance_scale_embedding(w64, 8, dtype=torch.float64)
    assert embedding.dtype == torch.float64
    angles = [7500.0 * math.exp(-i * math.log(10000.0) / 3) for i in range(4)]
    expected = [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    assert embedding[0].tolist() == pytest.approx(expected, abs=1e-9)
    assert guidance_scale_embedding(torch.zeros(2, device="meta"), 8).device.type == "meta"
