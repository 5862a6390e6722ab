import copy
import dataclasses

import pytest
import torch

from rglcd.losses import ConsistencyDistance
from rglcd.matching import DiscriminatorHead, discriminator_loss, dmd_gradient, dmd_loss, fake_score_loss
from rglcd.models import build_student, build_target, encode_prompts, load_teacher, reward_input
from rglcd.rewards import build_reward
from rglcd.schedules import guidance_scale_embedding
from rglcd.step import (
    Distillation,
    MatchingNoise,
    MatchingTerms,
    SampleTarget,
    StepNoise,
    StepReward,
    consistency_sample,
    matching_terms,
    rglcd_step,
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
