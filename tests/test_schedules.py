import math

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
