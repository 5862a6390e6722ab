import copy
import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rglcd.losses import ConsistencyDistance
from rglcd.matching import DiscriminatorHead, discriminator_loss, dmd_gradient, dmd_loss, fake_score_loss
from rglcd.models import build_student, build_target, encode_prompts, load_teacher, reward_input
from rglcd.rewards import build_reward
from rglcd.schedules import NoiseSchedule, guidance_scale_embedding
from rglcd.step import (
    Distillation,
    MatchingNoise,
    MatchingTerms,
    SampleTarget,
    StepNoise,
    StepOutput,
    StepReward,
    consistency_function,
    consistency_sample,
    matching_terms,
    rglcd_step,
    teacher_cfg_prediction,
    teacher_ddim_cfg_step,
)

from .reference_step import (
    decoded_images,
    reference_dmd_loss,
    reference_fake_score_loss,
    reference_lcm_sample,
    reference_logits,
    reference_rglcd_step,
)

PROMPTS = ["a red circle", "two blue squares", "a green triangle on the left"]


def perturb(module, generator, scale=0.02):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def setup(request, teacher_dirs):
    teacher = load_teacher(teacher_dirs[request.param])
    generator = torch.Generator().manual_seed(7)
    student = build_student(teacher.unet)
    perturb(student, generator)  # student ≠ teacher, and w matters (cond_proj ≠ 0)
    target = build_target(student)
    perturb(target, generator)  # target ≠ student, as after some EMA updates
    images = torch.rand(len(PROMPTS), 3, 32, 32, generator=generator)
    with torch.no_grad():
        latents = teacher.vae.encode(images * 2 - 1).latent_dist.mean * teacher.vae.config.scaling_factor
        cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, PROMPTS)
        uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""] * len(PROMPTS))
    distillation = Distillation(teacher.schedule, distance=ConsistencyDistance("huber"))
    noise = StepNoise(
        noise=torch.randn(latents.shape, generator=generator, dtype=torch.float64),
        indices=torch.tensor([0, 24, 49]),  # the clamped first grid point, the middle, t = 999
        guidance=torch.tensor([5.0, 9.5, 15.0]),
    )
    # float64 throughout, so that 1e-5 tests the math and not float32 round-off amplified by CFG (1 + 2w).
    for module in (teacher.unet, teacher.vae, student, target):
        module.double()
    latents, cond, uncond = latents.double(), cond.double(), uncond.double()
    return teacher, student, target, distillation, latents, cond, uncond, noise


def weighted(reward, beta):
    """R = β·r: the β-weighted reward a StepReward carries (the Mix applies the configured β's)."""
    return lambda images, prompts: beta * reward(images, prompts)


def run_both(setup, reward=None, beta=0.0, lcd_weight=1.0):
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    term = StepReward(weighted(reward, beta), reward_input(teacher.vae)) if reward is not None and beta else None
    ours = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS, reward=term,
        consistency_weight=lcd_weight,
    )  # fmt: skip
    reference = reference_rglcd_step(
        teacher.unet, student, target, teacher.vae, teacher.scheduler_config, latents, cond, uncond,
        noise.noise, noise.indices, noise.guidance, PROMPTS, reward=reward, beta=beta,
    )  # fmt: skip
    return ours, reference


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_step_matches_independent_reference(setup, beta):
    reward = build_reward("colorfulness") if beta else None
    ours, (loss, distill, rewards, model_pred, target) = run_both(setup, reward, beta)
    torch.testing.assert_close(ours.model_pred, model_pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.target, target, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.distill_loss, distill.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, loss, atol=1e-5, rtol=0)
    if beta:
        torch.testing.assert_close(ours.reward, beta * rewards, atol=1e-5, rtol=0)
        assert ours.loss.item() != pytest.approx(ours.distill_loss.item())


def test_without_a_reward_the_loss_is_exactly_lcd(setup):
    ours, _ = run_both(setup)
    assert ours.reward is None and list(ours.terms) == ["consistency"]
    assert torch.equal(ours.loss.detach(), ours.distill_loss)


def test_the_loss_is_the_sum_of_its_named_weighted_terms(setup):
    """λ·d − mean(β·r): each term logged as it enters the loss (weighted), the consistency distance unweighted."""
    ours, _ = run_both(setup, build_reward("colorfulness"), 0.5, lcd_weight=0.25)
    assert list(ours.terms) == ["consistency", "reward"]
    assert torch.equal(ours.terms["consistency"], 0.25 * ours.distill_loss)
    assert torch.equal(ours.terms["reward"], -ours.reward.mean().detach())
    torch.testing.assert_close(ours.loss.detach(), ours.terms["consistency"] + ours.terms["reward"], atol=0, rtol=0)
    assert all(not term.requires_grad for term in ours.terms.values()) and ours.loss.requires_grad


def test_gradients_reach_only_the_student_and_the_reward_moves_them(setup):
    teacher, student, target, *_ = setup
    gradients = {}
    for beta in (0.0, 2.0):
        student.zero_grad(set_to_none=True)
        ours, _ = run_both(setup, build_reward("colorfulness"), beta)
        ours.loss.backward()
        gradients[beta] = student.conv_in.weight.grad.clone()
    for frozen in (teacher.unet, teacher.vae, teacher.text_encoder, target):
        assert all(parameter.grad is None for parameter in frozen.parameters())
    assert student.time_embedding.cond_proj.weight.grad is not None
    # The reward term changes the student's gradient: it flows back through the VAE decoder.
    assert not torch.allclose(gradients[0.0], gradients[2.0])
    student.zero_grad(set_to_none=True)


def test_step_noise_draw_is_reproducible_and_in_range(setup):
    *_, distillation, latents, _, _, _ = setup
    draws = [StepNoise.draw(latents, distillation, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0].noise, draws[1].noise) and torch.equal(draws[0].indices, draws[1].indices)
    assert draws[0].noise.shape == latents.shape
    assert ((draws[0].indices >= 0) & (draws[0].indices < 50)).all()
    assert ((draws[0].guidance >= 5.0) & (draws[0].guidance <= 15.0)).all()


def test_a_latent_reward_reads_the_unscaled_prediction_without_decoding(setup):
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    seen = []

    def latent_reward(latents, prompts):
        seen.append(latents)
        return latents.mean(dim=(1, 2, 3))

    output = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS,
        reward=StepReward(weighted(latent_reward, 0.5), reward_input(teacher.vae, on_latents=True)),
    )  # fmt: skip
    (latents_seen,) = seen
    assert latents_seen.shape == latents.shape  # latents, not decoded images
    torch.testing.assert_close(latents_seen, output.model_pred / teacher.vae.config.scaling_factor)
    torch.testing.assert_close(output.loss, output.distill_loss - output.reward.mean())
    torch.testing.assert_close(output.reward, 0.5 * latents_seen.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("sample_steps,grad_steps", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_sampler_reward_matches_independent_reference(setup, sample_steps, grad_steps):
    """reward.target = sample: loss, reward, sample and the student's gradient against diffusers' LCMScheduler
    sampling (tests/reference_step.py), with the graph cut before the last ``grad_steps`` steps in both."""
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    reward, beta = build_reward("colorfulness"), 0.5
    draws = torch.Generator().manual_seed(5)  # the pipeline's order: initial latents, then each step's re-noising
    sample_noise = torch.stack(
        [torch.randn(latents.shape, generator=draws, dtype=torch.float64) for _ in range(sample_steps)]
    )
    sample_target = SampleTarget(distillation.sampling_timesteps(sample_steps), grad_steps)

    student.zero_grad(set_to_none=True)
    ours = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond,
        noise=dataclasses.replace(noise, sample_noise=sample_noise), prompts=PROMPTS,
        reward=StepReward(weighted(reward, beta), reward_input(teacher.vae), sample_target),
    )  # fmt: skip
    ours.loss.backward()
    our_gradients = {name: parameter.grad.clone() for name, parameter in student.named_parameters()}

    student.zero_grad(set_to_none=True)
    _, distill, *_ = reference_rglcd_step(
        teacher.unet, student, target, teacher.vae, teacher.scheduler_config, latents, cond, uncond,
        noise.noise, noise.indices, noise.guidance, PROMPTS,
    )  # fmt: skip
    sample = reference_lcm_sample(
        student, teacher.scheduler_config, cond, noise.guidance, sample_steps, grad_steps,
        torch.Generator().manual_seed(5), latents.shape, torch.float64,
    )  # fmt: skip
    rewards = reward(decoded_images(teacher.vae, sample), PROMPTS)
    loss = distill - beta * rewards.mean()
    loss.backward()

    torch.testing.assert_close(ours.sample, sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.reward, beta * rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, loss, atol=1e-5, rtol=0)
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(our_gradients[name], parameter.grad, atol=1e-7, rtol=1e-4, msg=name)
    student.zero_grad(set_to_none=True)


def test_sampler_gradient_is_truncated_to_the_last_steps(setup):
    """Through 1 of 2 steps the gradient differs from through both; without the sampler's noise it is an error."""
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    sample_noise = torch.randn((2, *latents.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gradients = []
    for grad_steps in (1, 2):
        student.zero_grad(set_to_none=True)
        output = rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
            latents=latents, cond_embeds=cond, uncond_embeds=uncond,
            noise=dataclasses.replace(noise, sample_noise=sample_noise), prompts=PROMPTS,
            reward=StepReward(
                weighted(build_reward("colorfulness"), 2.0), reward_input(teacher.vae),
                SampleTarget(distillation.sampling_timesteps(2), grad_steps),
            ),
        )  # fmt: skip
        output.loss.backward()
        gradients.append(student.conv_in.weight.grad.clone())
    assert not torch.allclose(gradients[0], gradients[1])
    student.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="sample's noise"):
        rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
            latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS,
            reward=StepReward(
                build_reward("colorfulness"), reward_input(teacher.vae),
                SampleTarget(distillation.sampling_timesteps(2)),
            ),
        )  # fmt: skip
    with pytest.raises(ValueError, match="grad_steps"):
        SampleTarget(distillation.sampling_timesteps(2), grad_steps=3)


def test_sample_noise_is_drawn_after_the_step_noise(setup):
    """A step with the sampler draws the same ε, n, w as one without (so reward.every keeps the other draws)."""
    *_, distillation, latents, _, _, _ = setup
    plain = StepNoise.draw(latents, distillation, torch.Generator().manual_seed(3))
    with_sampler = StepNoise.draw(latents, distillation, torch.Generator().manual_seed(3), sample_steps=4)
    assert plain.sample_noise is None and with_sampler.sample_noise.shape == (4, *latents.shape)
    assert torch.equal(plain.noise, with_sampler.noise) and torch.equal(plain.guidance, with_sampler.guidance)


def test_the_schedule_and_grid_live_on_the_steps_device(monkeypatch):
    """Moved once with the distillation: a step indexes ᾱ and the grid where its tensors are, with no copy from the
    CPU and no grid rebuilt (each a host sync on a GPU)."""
    from rglcd.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    distillation = Distillation(schedule).to("meta")
    assert distillation.grid.device.type == distillation.schedule.alphas_cumprod.device.type == "meta"
    monkeypatch.setattr("rglcd.step.ddim_grid", lambda *args: pytest.fail("the grid was rebuilt"))
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: pytest.fail("a copy") if self.device != a[0] else self
    )
    start = distillation.grid[torch.tensor([0, 49], device="meta")]
    alpha, sigma = distillation.schedule.alpha_sigma(start)
    assert alpha.device.type == sigma.device.type == "meta" and alpha.shape == (2, 1, 1, 1)
    assert distillation.sampling_timesteps(2).device.type == "meta"


def test_the_draw_reaches_every_grid_index_and_w_range():
    """n ∈ [0, N): the last index is t = 999, the timestep one-step sampling starts from (issue 28's randint(0, N − 1)
    mutation); w ∈ [w_min, w_max)."""
    from rglcd.schedules import NoiseSchedule

    distillation = Distillation(NoiseSchedule.from_config({"beta_schedule": "scaled_linear"}))
    noise = StepNoise.draw(torch.zeros(4000, 1, 1, 1), distillation, torch.Generator().manual_seed(0))
    assert set(noise.indices.tolist()) == set(range(distillation.num_ddim_timesteps))
    assert distillation.grid[noise.indices].max() == 999
    assert distillation.w_min <= noise.guidance.min() and noise.guidance.max() < distillation.w_max


@pytest.fixture(scope="module")
def fake_score(setup):
    """A fake score network ≠ the teacher (as after some fitting) and a discriminator head on its mid-block."""
    teacher = setup[0]
    fake_unet = copy.deepcopy(teacher.unet)
    perturb(fake_unet, torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    head = DiscriminatorHead(fake_unet.config.block_out_channels[-1]).double()
    return fake_unet, head


def matching_setup(setup, fake_score, dmd_weight, gan_weight, guidance_scale):
    *_, distillation, latents, _, _, noise = setup
    fake_unet, head = fake_score
    draws = torch.Generator().manual_seed(9)
    generator_noise = torch.randn((1, *latents.shape), generator=draws, dtype=torch.float64)
    terms = MatchingTerms(
        fake_unet, SampleTarget(distillation.sampling_timesteps(1)), dmd_weight, (20, 980), guidance_scale,
        gan_weight, head, 500,
    )  # fmt: skip
    drawn = MatchingNoise(
        generator_noise, torch.tensor([20, 500, 980]), torch.randn(latents.shape, generator=draws, dtype=torch.float64),
        torch.tensor([0, 250, 499]), torch.randn(latents.shape, generator=draws, dtype=torch.float64),
    )  # fmt: skip
    return terms, dataclasses.replace(noise, matching=drawn)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_dmd_term_matches_independent_reference(setup, fake_score, guidance_scale):
    """The DMD loss and the student's gradient through its 1-step sample against tests/reference_step.py (diffusers'
    schedulers, two teacher passes, DMD2's normaliser), at the step's w and at a fixed real guidance."""
    teacher, student, _, distillation, latents, cond, uncond, noise = setup
    terms, noise = matching_setup(setup, fake_score, 0.5, 0.0, guidance_scale)
    student.zero_grad(set_to_none=True)
    generated = consistency_sample(
        student, terms.generator, noise.matching.generator_noise, guidance_scale_embedding(noise.guidance).double(),
        cond, distillation,
    )  # fmt: skip
    ours = matching_terms(terms, generated, noise, teacher.unet, cond, uncond, distillation)
    assert list(ours) == ["dmd"]
    ours["dmd"].backward()
    our_gradients = {name: param.grad.clone() for name, param in student.named_parameters() if param.grad is not None}

    student.zero_grad(set_to_none=True)
    sample = reference_lcm_sample(
        student, teacher.scheduler_config, cond, noise.guidance, 1, 1, torch.Generator().manual_seed(9),
        latents.shape, torch.float64,
    )  # fmt: skip
    scale = noise.guidance + 1 if guidance_scale is None else torch.full_like(noise.guidance, guidance_scale)
    reference = 0.5 * reference_dmd_loss(
        teacher.unet, fake_score[0], teacher.scheduler_config, sample, cond, uncond, noise.matching.dmd_timesteps,
        noise.matching.dmd_noise, scale.view(-1, 1, 1, 1),
    )  # fmt: skip
    reference.backward()
    torch.testing.assert_close(ours["dmd"], reference, atol=1e-8, rtol=1e-5)
    assert our_gradients.keys() == {name for name, param in student.named_parameters() if param.grad is not None}
    for name, param in student.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(our_gradients[name], param.grad, atol=1e-9, rtol=1e-4, msg=name)
    student.zero_grad(set_to_none=True)


def test_gan_terms_and_fake_score_loss_match_independent_reference(setup, fake_score):
    """The generator's non-saturating loss, the discriminator's loss and accuracy, and the fake network's denoising
    loss against tests/reference_step.py."""
    teacher, _, _, distillation, latents, cond, uncond, noise = setup
    fake_unet, head = fake_score
    terms, noise = matching_setup(setup, fake_score, 0.0, 2.0, None)
    samples = latents.flip(0) * 0.9  # stand-in generator samples ≠ the data
    ours = matching_terms(terms, samples, noise, teacher.unet, cond, uncond, distillation)
    assert list(ours) == ["gan"]
    fake_logits = reference_logits(
        fake_unet, head, teacher.scheduler_config, samples, cond, noise.matching.gan_timesteps, noise.matching.gan_noise
    )
    torch.testing.assert_close(ours["gan"], 2.0 * -torch.log(torch.sigmoid(fake_logits)).mean(), atol=1e-8, rtol=1e-6)

    both_noise = torch.cat([noise.noise, noise.matching.gan_noise])
    both_t = torch.cat([torch.tensor([10, 300, 499]), noise.matching.gan_timesteps])
    loss, accuracy = discriminator_loss(
        fake_unet, head, latents, samples, both_noise, both_t, cond, distillation.schedule
    )
    real_logits = reference_logits(fake_unet, head, teacher.scheduler_config, latents, cond, both_t[:3], both_noise[:3])
    fake_logits = reference_logits(fake_unet, head, teacher.scheduler_config, samples, cond, both_t[3:], both_noise[3:])
    expected = -torch.log(1 - torch.sigmoid(fake_logits)).mean() - torch.log(torch.sigmoid(real_logits)).mean()
    torch.testing.assert_close(loss, expected, atol=1e-8, rtol=1e-6)
    right = (real_logits > 0).sum() + (fake_logits < 0).sum()
    assert accuracy.item() == pytest.approx(right.item() / 6)

    t = torch.tensor([0, 400, 999])
    ours = fake_score_loss(fake_unet, samples, noise.noise, t, cond, distillation.schedule)
    reference = reference_fake_score_loss(fake_unet, teacher.scheduler_config, samples, cond, t, noise.noise)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-6)


def test_the_dmd_gradient_is_the_normalised_score_difference():
    """Exact values: ∇ = (fake − real) / mean|x − real| per sample, 0 where the teacher reconstructs x exactly; the
    stop-gradient loss has the gradient ∇ / numel."""
    sample = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]], dtype=torch.float64, requires_grad=True)  # [2, 1, 1, 2]
    real = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 2.0]]]], dtype=torch.float64)
    fake = torch.tensor([[[[0.5, 2.0]]], [[[1.0, 1.0]]]], dtype=torch.float64)
    grad = dmd_gradient(sample, real, fake)
    assert grad.tolist() == [[[[1 / 3, 2 / 3]]], [[[0.0, 0.0]]]]  # mean|x − real| = 1.5; then x/0 -> 0
    dmd_loss(sample, grad).backward()
    torch.testing.assert_close(sample.grad, grad / 4)


# Exact values with stand-in UNets (no model): a 10-step schedule ᾱ_t = 0.91 − 0.09·t, the grid [1, 3, 5, 7, 9]
# (N = 5, k = 2), and outputs a·z + mean(embedding), so that cond and uncond differ by a known constant. The step
# computes c_skip and c_out in float32 (schedules.boundary_scalings, as diffusers), hence rel=1e-6 where they enter.
ALPHAS_CUMPROD = [0.91 - 0.09 * t for t in range(10)]


def tiny_distillation(prediction_type="epsilon", dtype=torch.float64, **kwargs):
    schedule = NoiseSchedule(torch.tensor(ALPHAS_CUMPROD, dtype=dtype), prediction_type)
    return Distillation(schedule, num_ddim_timesteps=5, **kwargs)


def alpha_sigma(t):
    return math.sqrt(ALPHAS_CUMPROD[t]), math.sqrt(1 - ALPHAS_CUMPROD[t])


def c_skip_out(t, sigma_data=0.5, scaling=10.0):
    return sigma_data**2 / ((scaling * t) ** 2 + sigma_data**2), scaling * t / math.sqrt(
        (scaling * t) ** 2 + sigma_data**2
    )


class LinearUNet(nn.Module):
    """A stand-in UNet: output a·z + mean(text embedding) per sample, recording what each call was given."""

    def __init__(self, a=0.5):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.mid_block = nn.Identity()
        self.calls = []

    def forward(self, z, timesteps, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None):
        call = {
            "z": z,
            "t": timesteps,
            "text": encoder_hidden_states,
            "cond": timestep_cond,
            "added": added_cond_kwargs,
        }
        self.calls.append(call)
        shift = encoder_hidden_states.mean(dim=(1, 2)).view(-1, *([1] * (z.ndim - 1)))
        return SimpleNamespace(sample=self.a * self.mid_block(z) + shift)


def embeds(*values):
    return torch.tensor(values, dtype=torch.float64).view(-1, 1, 1)


def test_distillation_settings_are_lcms_and_checked():
    """LCM's defaults (N = 50, w ∈ [5, 15], huber, σ_data = 0.5, t × 10, a 256-wide w embedding); w_min = w_max is
    one fixed w, w_min > w_max an error naming both; k = T // N."""
    distillation = Distillation(NoiseSchedule(torch.ones(1000)))
    assert (distillation.num_ddim_timesteps, distillation.w_min, distillation.w_max) == (50, 5.0, 15.0)
    assert (distillation.sigma_data, distillation.timestep_scaling, distillation.time_cond_proj_dim) == (0.5, 10.0, 256)
    assert distillation.distance == ConsistencyDistance("huber") and distillation.skip == 20
    assert Distillation(NoiseSchedule(torch.ones(1000)), num_ddim_timesteps=3).skip == 333
    assert tiny_distillation(w_min=7.0, w_max=7.0).grid.tolist() == [1, 3, 5, 7, 9]
    assert tiny_distillation().sampling_timesteps(2).tolist() == [9, 5]  # the grid from its end at ⌊i·N/K⌋
    with pytest.raises(ValueError, match=r"^w_min \(8\.0\) must not exceed w_max \(7\.0\)$"):
        tiny_distillation(w_min=8.0, w_max=7.0)


def test_sample_target_takes_1_to_k_gradient_steps():
    timesteps = torch.tensor([9, 3])
    assert SampleTarget(timesteps).grad_steps == 1 and SampleTarget(timesteps, 2).num_steps == 2
    for bad in (0, 3):
        with pytest.raises(ValueError, match=rf"^grad_steps must be in \[1, 2\], got {bad}$"):
            SampleTarget(timesteps, bad)


def test_the_step_noise_is_drawn_in_a_fixed_order_in_float32():
    """ε, then n ~ U{0, …, N − 1}, then u ~ U[0, 1) with w = w_min + (w_max − w_min)·u, then the sample's noise: the
    same draws as from the generator directly, float32 even under a float64 default dtype, on the latents' device."""
    distillation, shape = tiny_distillation(w_min=2.0, w_max=6.0), (3, 1, 2, 2)
    generator = torch.Generator().manual_seed(11)
    expected = [
        torch.randn(shape, generator=generator), torch.randint(0, 5, (3,), generator=generator),
        2.0 + 4.0 * torch.rand(3, generator=generator), torch.randn((2, *shape), generator=generator),
    ]  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        drawn = StepNoise.draw(torch.zeros(shape), distillation, torch.Generator().manual_seed(11), sample_steps=2)
    finally:
        torch.set_default_dtype(default)
    for ours, theirs in zip((drawn.noise, drawn.indices, drawn.guidance, drawn.sample_noise), expected, strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    drawn = StepNoise.draw(torch.zeros(shape, device="meta"), distillation, generator, sample_steps=2)
    assert {t.device.type for t in (drawn.noise, drawn.indices, drawn.guidance, drawn.sample_noise)} == {"meta"}


def test_matching_noise_is_drawn_in_a_fixed_order_over_both_ends_of_its_ranges():
    """The generator's noise [K, B, …], DMD's t ~ U{lo, …, hi} (both ends drawn), its ε, the GAN's t ~ U{0, …,
    gan_timesteps − 1} (both ends drawn), its ε: the generator's draws in that order, on the latents' device."""
    terms = MatchingTerms(None, SampleTarget(torch.tensor([9, 3])), 1.0, (3, 5), gan_timesteps=4)
    shape = (2000, 1, 1, 1)
    drawn = MatchingNoise.draw(torch.zeros(shape), terms, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    expected = [
        torch.randn((2, *shape), generator=generator), torch.randint(3, 6, (2000,), generator=generator),
        torch.randn(shape, generator=generator), torch.randint(0, 4, (2000,), generator=generator),
        torch.randn(shape, generator=generator),
    ]  # fmt: skip
    fields = (drawn.generator_noise, drawn.dmd_timesteps, drawn.dmd_noise, drawn.gan_timesteps, drawn.gan_noise)
    for ours, theirs in zip(fields, expected, strict=True):
        assert torch.equal(ours, theirs)
    assert set(drawn.dmd_timesteps.tolist()) == {3, 4, 5} and set(drawn.gan_timesteps.tolist()) == {0, 1, 2, 3}
    on_meta = MatchingNoise.draw(torch.zeros(2, 1, 1, 1, device="meta"), terms, generator)
    assert {getattr(on_meta, field.name).device.type for field in dataclasses.fields(MatchingNoise)} == {"meta"}


def test_the_scored_latents_are_the_sample_else_the_prediction():
    prediction, sample = torch.zeros(1), torch.ones(1)
    assert StepOutput(torch.zeros(()), {}, torch.zeros(()), None, prediction, prediction).scored is prediction
    assert StepOutput(torch.zeros(()), {}, torch.zeros(()), None, prediction, prediction, sample).scored is sample


@pytest.mark.parametrize("prediction_type, sigma_data, scaling", [("epsilon", 0.5, 10.0), ("v_prediction", 1.0, 2.0)])
def test_the_consistency_function_exact(prediction_type, sigma_data, scaling):
    """f = c_skip(t)·z + c_out(t)·x̂0 with x̂0 from the UNet's output a·z + m, checked in float64 against the
    formulas written out (with the distillation's σ_data and t scaling); the UNet gets z, t, the text embedding,
    the w embedding and the added conditions; its output is taken in z's dtype (float32 z: a float32 f)."""
    distillation = tiny_distillation(prediction_type, sigma_data=sigma_data, timestep_scaling=scaling)
    unet, z, t = LinearUNet(0.5), torch.tensor([[[[1.5]]], [[[-2.0]]]], dtype=torch.float64), torch.tensor([1, 9])
    w_embedding, added = torch.ones(2, 4), {"text_embeds": torch.ones(2, 3)}
    result = consistency_function(unet, z, t, w_embedding, embeds(0.25, -1.0), distillation, added)
    for b, (z_b, t_b, m_b) in enumerate(zip((1.5, -2.0), (1, 9), (0.25, -1.0), strict=True)):
        alpha, sigma = alpha_sigma(t_b)
        output = 0.5 * z_b + m_b
        x0 = (z_b - sigma * output) / alpha if prediction_type == "epsilon" else alpha * z_b - sigma * output
        c_skip, c_out = c_skip_out(t_b, sigma_data, scaling)
        assert result[b].item() == pytest.approx(c_skip * z_b + c_out * x0, rel=1e-6)
    (call,) = unet.calls
    assert torch.equal(call["z"], z) and torch.equal(call["t"], t)
    assert call["cond"] is w_embedding and call["added"] is added
    float32 = tiny_distillation(prediction_type, torch.float32)  # ᾱ as from_config makes it
    assert consistency_function(unet, z.float(), t, None, embeds(0.0, 0.0), float32).dtype == torch.float32


def test_the_teachers_ddim_step_with_cfg_exact():
    """ẑ_{t_n} = α_{t_n}·x̂0 + σ_{t_n}·ε̂ with x̂ = cond + w·(cond − uncond), from t_{n+k} = grid[n] to
    t_n = t_{n+k} − k, clamped at 0 (n = 0: t = 1 → 0). One batched teacher pass over [cond; uncond] with the added
    conditions of each half."""
    distillation, teacher = tiny_distillation(), LinearUNet(0.5)
    z, indices, w = torch.tensor([[1.5], [-2.0]], dtype=torch.float64), torch.tensor([0, 3]), [2.0, 7.5]  # [B, d]
    added = {"time_ids": torch.tensor([[1.0], [2.0]])}  # float32: cast to the teacher's float64
    uncond_added = {"time_ids": torch.tensor([[3.0], [4.0]])}
    result = teacher_ddim_cfg_step(
        teacher, z, indices, torch.tensor(w, dtype=torch.float64), embeds(0.25, -1.0), embeds(0.0, 0.5),
        distillation, added, uncond_added,
    )  # fmt: skip
    for b, (z_b, start, previous, cond, uncond) in enumerate([(1.5, 1, 0, 0.25, 0.0), (-2.0, 7, 5, -1.0, 0.5)]):
        alpha, sigma = alpha_sigma(start)
        eps_c, eps_u = 0.5 * z_b + cond, 0.5 * z_b + uncond
        x0_c, x0_u = (z_b - sigma * eps_c) / alpha, (z_b - sigma * eps_u) / alpha
        x0, eps = x0_c + w[b] * (x0_c - x0_u), eps_c + w[b] * (eps_c - eps_u)
        alpha_prev, sigma_prev = alpha_sigma(previous)
        assert result[b].item() == pytest.approx(alpha_prev * x0 + sigma_prev * eps, abs=1e-12)
    assert result.shape == (2, 1)
    (call,) = teacher.calls
    assert call["t"].tolist() == [1, 7, 1, 7] and call["cond"] is None
    assert call["added"]["time_ids"].flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert call["added"]["time_ids"].dtype == torch.float64  # in the teacher's dtype
    assert call["text"].flatten().tolist() == [0.25, -1.0, 0.0, 0.5]


def test_the_teachers_cfg_estimates_for_a_sample_teacher():
    """x̂0 and ε̂ of an x0-predicting teacher (ε̂ = (z − α·x̂0)/σ), each guided as cond + w·(cond − uncond)."""
    schedule = tiny_distillation("sample").schedule
    z, t, w, teacher = torch.tensor([[[[1.5]]]], dtype=torch.float64), torch.tensor([4]), 3.0, LinearUNet(0.5)
    x0, eps = teacher_cfg_prediction(
        teacher, z, t, torch.tensor([w], dtype=torch.float64), embeds(0.25), embeds(-0.5), schedule
    )
    assert teacher.calls[0]["added"] is None  # no SDXL conditions
    alpha, sigma = alpha_sigma(4)
    x0_c, x0_u = 0.5 * 1.5 + 0.25, 0.5 * 1.5 - 0.5
    eps_c, eps_u = (1.5 - alpha * x0_c) / sigma, (1.5 - alpha * x0_u) / sigma
    assert x0.item() == pytest.approx(x0_c + w * (x0_c - x0_u), abs=1e-12)
    assert eps.item() == pytest.approx(eps_c + w * (eps_c - eps_u), abs=1e-12)
    # A float32 z and float32 text embeddings: the float64 teacher gets its dtype, the estimates come back float32.
    x0, eps = teacher_cfg_prediction(
        teacher, z.float(), t, torch.tensor([w]), embeds(0.25).float(), embeds(-0.5).float(),
        tiny_distillation("sample", torch.float32).schedule,
    )  # fmt: skip
    assert teacher.calls[1]["z"].dtype == teacher.calls[1]["text"].dtype == torch.float64
    assert x0.dtype == eps.dtype == torch.float32


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_consistency_sampling_exact_and_its_gradient_truncated(grad_steps):
    """Two steps from z_9 = ε_0: ẑ = f(z_9, 9), z_3 = α_3·ẑ + σ_3·ε_1, result f(z_3, 3), in float64; its gradient
    with respect to the UNet's a flows through the last ``grad_steps`` steps only (here: with 1, z_3 is a constant)."""
    distillation, unet = tiny_distillation(), LinearUNet(0.5)
    noise = torch.tensor([[[1.5]], [[-0.5]]], dtype=torch.float64)  # [K=2, B=1, d=1]: latents of any rank
    target, added = SampleTarget(torch.tensor([9, 3]), grad_steps), {"text_embeds": torch.ones(1, 2)}
    result = consistency_sample(unet, target, noise, None, embeds(0.25), distillation, added)
    assert result.shape == (1, 1) and all(call["added"] is added for call in unet.calls)

    def f(z, t, a):  # the consistency function of the ε-UNet a·z + 0.25, written out
        alpha, sigma = alpha_sigma(t)
        c_skip, c_out = c_skip_out(t)
        return c_skip * z + c_out * (z - sigma * (a * z + 0.25)) / alpha

    alpha_3, sigma_3 = alpha_sigma(3)
    z_3 = alpha_3 * f(1.5, 9, 0.5) + sigma_3 * -0.5
    assert result.item() == pytest.approx(f(z_3, 3, 0.5), rel=1e-6)
    assert [call["t"].tolist() for call in unet.calls] == [[9], [3]]
    result.sum().backward()
    h = 1e-6  # the gradient by central differences of the written-out formula, z_3 fixed or not
    if grad_steps == 1:
        expected = (f(z_3, 3, 0.5 + h) - f(z_3, 3, 0.5 - h)) / (2 * h)
    else:
        z_3_of = lambda a: alpha_3 * f(1.5, 9, a) + sigma_3 * -0.5
        expected = (f(z_3_of(0.5 + h), 3, 0.5 + h) - f(z_3_of(0.5 - h), 3, 0.5 - h)) / (2 * h)
    assert unet.a.grad.item() == pytest.approx(expected, rel=1e-6)


def test_consistency_sampling_runs_on_the_noises_device():
    """The sampling timesteps are moved to the noise's device (meta here), for the UNet and for ᾱ."""
    distillation, unet = tiny_distillation().to("meta"), LinearUNet(0.5).to("meta")
    noise = torch.zeros(2, 1, 1, 1, 1, dtype=torch.float64, device="meta")
    result = consistency_sample(unet, SampleTarget(torch.tensor([9, 3])), noise, None, embeds(0.0).to("meta"),
                                distillation)  # fmt: skip
    assert result.device.type == "meta" and {call["t"].device.type for call in unet.calls} == {"meta"}


def test_the_matching_terms_pass_the_added_conditions_and_noise_in_the_samples_precision():
    """DMD's teacher pass gets the captions' and the empty prompt's added conditions (SDXL; one batched pass), the
    fake network's DMD and GAN passes the captions'. Both noisings cast ε to the sample's dtype: a float32 sample
    with float64 ε = 0.1 is noised with float32(0.1), z_t = α_t·x + σ_t·float32(0.1)."""
    distillation, teacher, fake = tiny_distillation(), LinearUNet(0.5), LinearUNet(0.25)
    head = lambda features: features.flatten(1).mean(dim=1)  # a logit per sample from the mid-block
    terms = MatchingTerms(fake, SampleTarget(torch.tensor([9])), 1.0, (3, 5), None, 1.0, head, 10)
    shape, f64 = (2, 1, 1, 1), torch.float64
    epsilon = torch.full(shape, 0.1, dtype=f64)
    drawn = MatchingNoise(torch.zeros(1, *shape), torch.tensor([3, 5]), epsilon, torch.tensor([0, 9]), epsilon)
    noise = StepNoise(torch.zeros(shape), torch.tensor([0, 1]), torch.tensor([2.0, 3.0], dtype=f64), matching=drawn)
    added = {"time_ids": torch.tensor([[1.0], [2.0]], dtype=f64)}
    uncond_added = {"time_ids": torch.tensor([[3.0], [4.0]], dtype=f64)}
    generated = torch.tensor([1.5, -2.0]).view(shape).requires_grad_()  # float32
    cond, uncond = embeds(0.25, -1.0), embeds(0.0, 0.5)
    out = matching_terms(terms, generated, noise, teacher, cond, uncond, distillation, added, uncond_added)
    assert list(out) == ["dmd", "gan"]
    (teacher_call,) = teacher.calls
    assert teacher_call["added"]["time_ids"].flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [call["added"]["time_ids"].flatten().tolist() for call in fake.calls] == [[1.0, 2.0], [1.0, 2.0]]
    eps32 = float(torch.tensor(0.1, dtype=torch.float32))
    for z, timesteps in ((teacher_call["z"][:2], (3, 5)), (fake.calls[1]["z"], (0, 9))):
        for b, (x, t) in enumerate(zip((1.5, -2.0), timesteps, strict=True)):
            alpha, sigma = alpha_sigma(t)
            assert z[b].item() == pytest.approx(alpha * x + sigma * eps32, abs=1e-13)


def test_the_teachers_step_runs_on_the_indices_device():
    """The grid is indexed on the indices' device (meta here) when the distillation was not moved there."""
    teacher, meta = LinearUNet(0.5).to("meta"), torch.device("meta")
    z = torch.zeros(2, 1, dtype=torch.float64, device=meta)
    guidance = torch.ones(2, dtype=torch.float64, device=meta)
    result = teacher_ddim_cfg_step(
        teacher, z, torch.tensor([0, 3], device=meta), guidance, embeds(0.0, 0.0).to(meta), embeds(0.0, 0.0).to(meta),
        tiny_distillation(),
    )  # fmt: skip
    assert result.device == meta and teacher.calls[0]["t"].device == meta


def test_a_step_without_the_noise_its_terms_need_is_refused_first():
    """Before any model runs: a reward on the sample without the sample's noise, matching terms without theirs."""
    distillation, shape = tiny_distillation(), (1, 1, 1, 1)
    noise = StepNoise(torch.zeros(shape), torch.tensor([0]), torch.ones(1))
    models = {"student": None, "target": None, "teacher_unet": None, "distillation": distillation}
    inputs = {"latents": torch.zeros(shape), "cond_embeds": embeds(0.0), "uncond_embeds": embeds(0.0), "noise": noise}
    reward = StepReward(lambda images, prompts: images.mean(), lambda latents: latents, SampleTarget(torch.tensor([9])))
    message = "a reward on the sample needs the sample's noise: StepNoise.draw(..., sample_steps=K)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        rglcd_step(**models, **inputs, reward=reward)
    terms = MatchingTerms(None, SampleTarget(torch.tensor([9])), 1.0, (3, 5))
    message = "the matching terms need their noise: StepNoise.matching = MatchingNoise.draw(...)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        rglcd_step(**models, **inputs, matching=terms)


def written_out_step(x, eps, start, previous, w, cond, uncond, a_student=0.5, a_target=0.3, a_teacher=0.5):
    """One sample's (model_pred, target) of the LCD step with the stand-in UNets, from the formulas."""

    def f(z, t, a):  # the consistency function of the ε-UNet a·z + cond
        alpha, sigma = alpha_sigma(t)
        c_skip, c_out = c_skip_out(t)
        return c_skip * z + c_out * (z - sigma * (a * z + cond)) / alpha

    alpha, sigma = alpha_sigma(start)
    z = alpha * x + sigma * eps
    eps_c, eps_u = a_teacher * z + cond, a_teacher * z + uncond
    x0_c, x0_u = (z - sigma * eps_c) / alpha, (z - sigma * eps_u) / alpha
    alpha_prev, sigma_prev = alpha_sigma(previous)
    z_prev = alpha_prev * (x0_c + w * (x0_c - x0_u)) + sigma_prev * (eps_c + w * (eps_c - eps_u))
    return f(z, start, a_student), f(z_prev, previous, a_target)


def test_the_step_exact_with_its_reward_and_conditions():
    """The whole step in float64 against the formulas: t_{n+k} = grid[n], t_n = t_{n+k} − k clamped at 0, z from
    x and ε, the teacher's guided DDIM step, the student's and the target's consistency functions, the huber
    distance (c = 0.001), λ·d − mean(R(reader(model_pred))). Each network gets the step's w embedding (8 wide here)
    and the added conditions (the teacher the empty prompt's too)."""
    distillation = tiny_distillation(time_cond_proj_dim=8)
    student, target, teacher = LinearUNet(0.5), LinearUNet(0.3), LinearUNet(0.5)
    x, eps, w, cond, uncond = [0.2, -0.4], [1.5, -0.5], [2.0, 7.5], [0.25, -1.0], [0.0, 0.5]
    f64 = torch.float64
    noise = StepNoise(torch.tensor(eps, dtype=f64).view(2, 1), torch.tensor([0, 3]), torch.tensor(w, dtype=f64))
    added = {"time_ids": torch.tensor([[1.0], [2.0]], dtype=f64)}
    uncond_added = {"time_ids": torch.tensor([[3.0], [4.0]], dtype=f64)}
    seen = []
    reward = StepReward(lambda images, prompts: seen.append(prompts) or 2 * images.sum(dim=1), lambda z: z + 1)
    output = rglcd_step(
        student=student, target=target, teacher_unet=teacher, distillation=distillation,
        latents=torch.tensor(x, dtype=f64).view(2, 1), cond_embeds=embeds(*cond), uncond_embeds=embeds(*uncond),
        noise=noise, prompts=("a", "b"), reward=reward, consistency_weight=0.5, added_cond=added,
        uncond_added_cond=uncond_added,
    )  # fmt: skip
    expected = [
        written_out_step(x[b], eps[b], t, p, w[b], cond[b], uncond[b]) for b, (t, p) in enumerate([(1, 0), (7, 5)])
    ]
    assert output.model_pred.flatten().tolist() == pytest.approx([pred for pred, _ in expected], rel=1e-6)
    assert output.target.flatten().tolist() == pytest.approx([tgt for _, tgt in expected], rel=1e-6)
    huber = [math.sqrt((pred - tgt) ** 2 + 1e-6) - 1e-3 for pred, tgt in expected]
    rewards = [2 * (pred + 1) for pred, _ in expected]
    assert output.distill_loss.item() == pytest.approx(sum(huber) / 2, rel=1e-6)
    assert output.reward.tolist() == pytest.approx(rewards, rel=1e-6) and seen == [["a", "b"]]
    assert output.terms["consistency"].item() == pytest.approx(0.5 * sum(huber) / 2, rel=1e-6)
    assert output.terms["reward"].item() == pytest.approx(-sum(rewards) / 2, rel=1e-6)
    assert output.loss.item() == pytest.approx(0.5 * sum(huber) / 2 - sum(rewards) / 2, rel=1e-6)
    assert output.sample is None and output.generated is None
    assert [call["t"].tolist() for call in (student.calls[0], teacher.calls[0], target.calls[0])] == [
        [1, 7], [1, 7, 1, 7], [0, 5],
    ]  # fmt: skip
    w_embedding = guidance_scale_embedding(torch.tensor(w, dtype=f64), 8)
    for call in (student.calls[0], target.calls[0]):
        assert torch.equal(call["cond"], w_embedding.to(f64)) and call["added"] is added
    assert teacher.calls[0]["added"]["time_ids"].flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_lora_step_gives_no_w_embedding_and_the_latents_the_noises_precision():
    """time_cond_proj_dim 0 (a LoRA student): the networks get no w embedding (None); float64 latents with float32
    noise are noised in float32: z = α·float32(x) + σ·ε."""
    distillation, student, target = tiny_distillation(time_cond_proj_dim=0), LinearUNet(0.5), LinearUNet(0.5)
    noise = StepNoise(torch.zeros(1, 1), torch.tensor([3]), torch.tensor([2.0]))
    rglcd_step(
        student=student, target=target, teacher_unet=LinearUNet(0.5), distillation=distillation,
        latents=torch.full((1, 1), 0.1, dtype=torch.float64), cond_embeds=embeds(0.0), uncond_embeds=embeds(0.0),
        noise=noise,
    )  # fmt: skip
    assert student.calls[0]["cond"] is None and target.calls[0]["cond"] is None
    alpha, _ = alpha_sigma(7)
    assert student.calls[0]["z"].item() == pytest.approx(alpha * float(torch.tensor(0.1)), abs=1e-13)


def test_a_step_with_matching_terms_adds_them_on_the_students_sample():
    """With MatchingTerms the loss is consistency + dmd + gan, the terms matching_terms gives on the student's
    one-step sample from the generator noise (returned detached), every pass with the added conditions; on the
    step's devices (meta here: the grid is indexed where n is)."""
    distillation, student, teacher = tiny_distillation(), LinearUNet(0.5), LinearUNet(0.5)
    fake = LinearUNet(0.25)
    head = lambda features: features.flatten(1).mean(dim=1)
    terms = MatchingTerms(fake, SampleTarget(torch.tensor([9])), 0.5, (3, 5), None, 2.0, head, 10)
    shape, f64 = (2, 1), torch.float64
    drawn = MatchingNoise(
        torch.tensor([[[0.3], [-0.7]]], dtype=f64), torch.tensor([3, 5]), torch.ones(shape, dtype=f64),
        torch.tensor([0, 9]), torch.ones(shape, dtype=f64),
    )  # fmt: skip
    noise = StepNoise(torch.ones(shape, dtype=f64), torch.tensor([0, 3]), torch.tensor([2.0, 3.0], dtype=f64))
    noise.matching = drawn
    added = {"time_ids": torch.tensor([[1.0], [2.0]], dtype=f64)}
    uncond_added = {"time_ids": torch.tensor([[3.0], [4.0]], dtype=f64)}
    cond, uncond = embeds(0.25, -1.0), embeds(0.0, 0.5)
    inputs = {
        "student": student, "target": LinearUNet(0.3), "teacher_unet": teacher, "distillation": distillation,
        "latents": torch.zeros(shape, dtype=f64), "cond_embeds": cond, "uncond_embeds": uncond, "noise": noise,
        "matching": terms, "added_cond": added, "uncond_added_cond": uncond_added,
    }  # fmt: skip
    output = rglcd_step(**inputs)
    assert list(output.terms) == ["consistency", "dmd", "gan"]
    assert output.loss.item() == pytest.approx(sum(term.item() for term in output.terms.values()), rel=1e-12)
    w_embedding = guidance_scale_embedding(noise.guidance, 256).to(f64)
    sample = consistency_sample(LinearUNet(0.5), terms.generator, drawn.generator_noise, w_embedding, cond,
                                distillation)  # fmt: skip
    assert torch.equal(output.generated, sample) and not output.generated.requires_grad
    assert torch.equal(student.calls[1]["z"], drawn.generator_noise[0]) and student.calls[1]["cond"] is not None
    expected = matching_terms(terms, sample, noise, LinearUNet(0.5), cond, uncond, distillation, added, uncond_added)
    assert {name: term.item() for name, term in expected.items()} == pytest.approx(
        {name: output.terms[name].item() for name in ("dmd", "gan")}, rel=1e-12
    )
    assert all(call["added"] is added for call in student.calls)
    assert [call["added"]["time_ids"].flatten().tolist() for call in teacher.calls] == [[1.0, 2.0, 3.0, 4.0]] * 2
    assert [call["added"]["time_ids"].flatten().tolist() for call in fake.calls[:2]] == [[1.0, 2.0]] * 2
    meta = torch.device("meta")
    on_meta = {key: value.to(meta) if isinstance(value, (torch.Tensor, nn.Module)) else value
               for key, value in inputs.items()}  # fmt: skip
    on_meta["noise"] = StepNoise(*(t.to(meta) for t in (noise.noise, noise.indices, noise.guidance)))
    on_meta["matching"], on_meta["added_cond"], on_meta["uncond_added_cond"] = None, None, None
    assert rglcd_step(**on_meta).loss.device == meta  # the distillation itself stays on the CPU


def test_a_reward_on_the_sample_reads_the_students_k_step_sample():
    """reward.target = sample: the reward reads the student's sample from the sample noise (K = 1 here: f(ε_0, 9)),
    made with the step's w embedding and added conditions, returned as StepOutput.sample and scored."""
    distillation, student, f64 = tiny_distillation(), LinearUNet(0.5), torch.float64
    noise = StepNoise(torch.zeros(1, 1, dtype=f64), torch.tensor([3]), torch.tensor([2.0], dtype=f64))
    noise.sample_noise = torch.tensor([[[0.7]]], dtype=f64)
    added = {"time_ids": torch.tensor([[1.0]], dtype=f64)}
    reward = StepReward(lambda images, prompts: images.sum(dim=1), lambda z: z, SampleTarget(torch.tensor([9])))
    output = rglcd_step(
        student=student, target=LinearUNet(0.5), teacher_unet=LinearUNet(0.5), distillation=distillation,
        latents=torch.zeros(1, 1, dtype=f64), cond_embeds=embeds(0.25), uncond_embeds=embeds(0.0), noise=noise,
        reward=reward, added_cond=added, uncond_added_cond={"time_ids": torch.tensor([[2.0]], dtype=f64)},
    )  # fmt: skip
    alpha, sigma = alpha_sigma(9)
    c_skip, c_out = c_skip_out(9)
    expected = c_skip * 0.7 + c_out * (0.7 - sigma * (0.5 * 0.7 + 0.25)) / alpha
    assert output.sample.item() == pytest.approx(expected, rel=1e-6) and output.scored is output.sample
    assert output.reward.item() == pytest.approx(expected, rel=1e-6)
    sampling_call = student.calls[1]
    assert sampling_call["t"].tolist() == [9] and sampling_call["added"] is added
    assert sampling_call["cond"] is student.calls[0]["cond"]
