import dataclasses

import pytest
import torch

from rglcd.losses import ConsistencyDistance
from rglcd.models import build_student, build_target, encode_prompts, load_teacher, reward_input
from rglcd.rewards import build_reward
from rglcd.step import Distillation, SamplerReward, StepNoise, rglcd_step

from .reference_step import decoded_images, reference_lcm_sample, reference_rglcd_step

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


def run_both(setup, reward=None, beta=0.0):
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    ours = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        reward_input=reward_input(teacher.vae),
        latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS,
        reward_fn=reward, reward_beta=beta,
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
        torch.testing.assert_close(ours.reward, rewards, atol=1e-5, rtol=0)
        assert ours.loss.item() != pytest.approx(ours.distill_loss.item())


def test_zero_beta_is_exactly_lcd(setup):
    ours, _ = run_both(setup, build_reward("colorfulness"), 0.0)
    assert ours.reward is None
    assert torch.equal(ours.loss.detach(), ours.distill_loss)


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


def test_nonzero_beta_without_reward_is_an_error(setup):
    with pytest.raises(ValueError, match="no reward_fn"):
        run_both(setup, None, 1.0)


def test_a_latent_reward_reads_the_unscaled_prediction_without_decoding(setup):
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    seen = []

    def latent_reward(latents, prompts):
        seen.append(latents)
        return latents.mean(dim=(1, 2, 3))

    output = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS,
        reward_fn=latent_reward, reward_beta=0.5, reward_input=reward_input(teacher.vae, on_latents=True),
    )  # fmt: skip
    (latents_seen,) = seen
    assert latents_seen.shape == latents.shape  # latents, not decoded images
    torch.testing.assert_close(latents_seen, output.model_pred / teacher.vae.config.scaling_factor)
    torch.testing.assert_close(output.loss, output.distill_loss - 0.5 * output.reward.mean())


@pytest.mark.parametrize("sample_steps,grad_steps", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_sampler_reward_matches_independent_reference(setup, sample_steps, grad_steps):
    """reward.target = sample: loss, reward, sample and the student's gradient against diffusers' LCMScheduler
    sampling (tests/reference_step.py), with the graph cut before the last ``grad_steps`` steps in both."""
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    reward, beta = build_reward("colorfulness"), 0.5
    draws = torch.Generator().manual_seed(5)  # the pipeline's order: initial latents, then each step's re-noising
    sampler_noise = torch.stack(
        [torch.randn(latents.shape, generator=draws, dtype=torch.float64) for _ in range(sample_steps)]
    )
    sampler = SamplerReward(distillation.sampling_timesteps(sample_steps), grad_steps)

    student.zero_grad(set_to_none=True)
    ours = rglcd_step(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        reward_input=reward_input(teacher.vae), latents=latents, cond_embeds=cond, uncond_embeds=uncond,
        noise=dataclasses.replace(noise, sampler_noise=sampler_noise), prompts=PROMPTS, reward_fn=reward,
        reward_beta=beta, sampler=sampler,
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
    torch.testing.assert_close(ours.reward, rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, loss, atol=1e-5, rtol=0)
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(our_gradients[name], parameter.grad, atol=1e-7, rtol=1e-4, msg=name)
    student.zero_grad(set_to_none=True)


def test_sampler_gradient_is_truncated_to_the_last_steps(setup):
    """Through 1 of 2 steps the gradient differs from through both; without the sampler's noise it is an error."""
    teacher, student, target, distillation, latents, cond, uncond, noise = setup
    sampler_noise = torch.randn((2, *latents.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gradients = []
    for grad_steps in (1, 2):
        student.zero_grad(set_to_none=True)
        output = rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
            reward_input=reward_input(teacher.vae), latents=latents, cond_embeds=cond, uncond_embeds=uncond,
            noise=dataclasses.replace(noise, sampler_noise=sampler_noise), prompts=PROMPTS,
            reward_fn=build_reward("colorfulness"), reward_beta=2.0,
            sampler=SamplerReward(distillation.sampling_timesteps(2), grad_steps),
        )  # fmt: skip
        output.loss.backward()
        gradients.append(student.conv_in.weight.grad.clone())
    assert not torch.allclose(gradients[0], gradients[1])
    student.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="sampler's noise"):
        rglcd_step(
            student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
            reward_input=reward_input(teacher.vae), latents=latents, cond_embeds=cond, uncond_embeds=uncond,
            noise=noise, prompts=PROMPTS, reward_fn=build_reward("colorfulness"), reward_beta=1.0,
            sampler=SamplerReward(distillation.sampling_timesteps(2)),
        )  # fmt: skip
    with pytest.raises(ValueError, match="grad_steps"):
        SamplerReward(distillation.sampling_timesteps(2), grad_steps=3)


def test_sampler_noise_is_drawn_after_the_step_noise(setup):
    """A step with the sampler draws the same ε, n, w as one without (so reward.every keeps the other draws)."""
    *_, distillation, latents, _, _, _ = setup
    plain = StepNoise.draw(latents, distillation, torch.Generator().manual_seed(3))
    with_sampler = StepNoise.draw(latents, distillation, torch.Generator().manual_seed(3), sampler_steps=4)
    assert plain.sampler_noise is None and with_sampler.sampler_noise.shape == (4, *latents.shape)
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
