"""A deliberately plain RG-LCD step written straight from ARCHITECTURE.md's numbered list.

It imports nothing from rglcd: schedules come from diffusers' own DDPMScheduler, and every formula is
spelled out inline, so that tests/test_step.py compares two independent implementations.
"""

import math

import torch
from diffusers import DDPMScheduler, LCMScheduler


def guidance_embedding(w, embed_dim=256):
    """LCM's Fourier embedding of w (× 1000), sin then cos."""
    half = embed_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    ang = (w * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def decoded_images(vae, latents):
    """Scaled latents -> images in [0, 1]."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return torch.clamp(images / 2 + 0.5, 0, 1)


def reference_rglcd_step(
    teacher_unet, student_unet, target_unet, vae, scheduler_config, latents, cond, uncond, noise, index, w,
    prompts, reward=None, beta=0.0, huber_c=0.001, num_ddim=50, embed_dim=256,
):  # fmt: skip
    scheduler = DDPMScheduler.from_config(scheduler_config)
    acp = scheduler.alphas_cumprod
    T = scheduler.config.num_train_timesteps
    kind = scheduler.config.prediction_type
    k = T // num_ddim

    # 2. the grid point t_{n+k} (noisy) and t_n = t_{n+k} - k (clamped at 0); w embedded as in LCM.
    t_start = (index + 1) * k - 1
    t_prev = torch.clamp(t_start - k, min=0)
    w_emb = guidance_embedding(w, embed_dim).to(latents.dtype)

    def a(t):
        return acp[t].sqrt().view(-1, 1, 1, 1)

    def s(t):
        return (1 - acp[t]).sqrt().view(-1, 1, 1, 1)

    def to_x0(out, z, t):
        if kind == "epsilon":
            return (z - s(t) * out) / a(t)
        if kind == "v_prediction":
            return a(t) * z - s(t) * out
        return out

    def to_eps(out, z, t):
        if kind == "epsilon":
            return out
        if kind == "v_prediction":
            return a(t) * out + s(t) * z
        return (z - a(t) * out) / s(t)

    def scalings(t):
        st = 10.0 * t.float()
        c_skip = 0.25 / (st**2 + 0.25)
        c_out = st / torch.sqrt(st**2 + 0.25)
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    # 3. forward noising with diffusers' own add_noise.
    z_start = scheduler.add_noise(latents, noise, t_start)

    # 4. student: x̂0 then the boundary-condition parameterisation.
    out = student_unet(z_start, t_start, encoder_hidden_states=cond, timestep_cond=w_emb).sample
    c_skip, c_out = scalings(t_start)
    model_pred = c_skip * z_start + c_out * to_x0(out, z_start, t_start)

    # 5. teacher, cond and uncond passes separately, CFG in the LCM convention, one DDIM step.
    with torch.no_grad():
        out_c = teacher_unet(z_start, t_start, encoder_hidden_states=cond).sample
        out_u = teacher_unet(z_start, t_start, encoder_hidden_states=uncond).sample
        wv = w.view(-1, 1, 1, 1)
        x0 = to_x0(out_c, z_start, t_start) + wv * (to_x0(out_c, z_start, t_start) - to_x0(out_u, z_start, t_start))
        eps = to_eps(out_c, z_start, t_start) + wv * (to_eps(out_c, z_start, t_start) - to_eps(out_u, z_start, t_start))
        z_prev = a(t_prev) * x0 + s(t_prev) * eps

        # 6. target network at (ẑ_{t_n}, t_n).
        out_t = target_unet(z_prev, t_prev, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        c_skip_p, c_out_p = scalings(t_prev)
        target = c_skip_p * z_prev + c_out_p * to_x0(out_t, z_prev, t_prev)

    # 7. the paper's Huber distance (elementwise, mean).
    distill = torch.mean(torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)

    # 8. reward of the decoded one-step prediction.
    loss = distill
    rewards = None
    if reward is not None and beta != 0:
        rewards = reward(decoded_images(vae, model_pred), prompts)
        loss = distill - beta * rewards.mean()
    return loss, distill, rewards, model_pred, target


def reference_lcm_sample(student_unet, scheduler_config, cond, w, num_steps, grad_steps, generator, shape, dtype):
    """The student's K-step sample as diffusers' LatentConsistencyModelPipeline makes it (its LCMScheduler picks the
    timesteps, applies c_skip/c_out and draws the re-noising from ``generator``, after the initial latents), keeping
    the graph through the last ``grad_steps`` steps only."""
    scheduler = LCMScheduler.from_config(scheduler_config, original_inference_steps=50, timestep_scaling=10.0)
    scheduler.set_timesteps(num_steps)
    w_emb = guidance_embedding(w).to(dtype)
    latents = torch.randn(shape, generator=generator, dtype=dtype)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= num_steps - grad_steps):
            out = student_unet(latents, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
            latents, denoised = scheduler.step(out, t, latents, generator=generator, return_dict=False)
    return denoised


def reference_dmd_loss(teacher_unet, fake_unet, scheduler_config, sample, cond, uncond, t, noise, guidance_scale):
    """DMD's generator loss written from the DMD2 paper: the real score with CFG (two passes), the fake one
    conditional, the gradient (p_real − p_fake) / mean|p_real| with p = x − x̂0, as ½·mean(x − sg(x − grad))²."""
    scheduler = DDPMScheduler.from_config(scheduler_config)
    acp, kind = scheduler.alphas_cumprod.to(sample.dtype), scheduler.config.prediction_type
    z = scheduler.add_noise(sample.detach(), noise, t)
    a, s = acp[t].sqrt().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().view(-1, 1, 1, 1)

    def to_x0(out):
        return (z - s * out) / a if kind == "epsilon" else a * z - s * out  # epsilon or v_prediction

    with torch.no_grad():
        cond_x0 = to_x0(teacher_unet(z, t, encoder_hidden_states=cond).sample)
        uncond_x0 = to_x0(teacher_unet(z, t, encoder_hidden_states=uncond).sample)
        real = uncond_x0 + guidance_scale * (cond_x0 - uncond_x0)
        fake = to_x0(fake_unet(z, t, encoder_hidden_states=cond).sample)
        p_real, p_fake = sample - real, sample - fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    return 0.5 * ((sample - (sample - grad).detach()) ** 2).mean()


def reference_logits(fake_unet, head, scheduler_config, latents, cond, t, noise):
    """The discriminator's logits on latents noised by diffusers' scheduler: the head on the mid-block's output."""
    z = DDPMScheduler.from_config(scheduler_config).add_noise(latents, noise, t)
    seen = []
    handle = fake_unet.mid_block.register_forward_hook(lambda module, args, output: seen.append(output))
    fake_unet(z, t, encoder_hidden_states=cond)
    handle.remove()
    return head(seen[0])


def reference_fake_score_loss(fake_unet, scheduler_config, samples, cond, t, noise):
    """The fake network's denoising loss: mean squared error against ε (epsilon) or v = α·ε − σ·x (v_prediction)."""
    scheduler = DDPMScheduler.from_config(scheduler_config)
    acp = scheduler.alphas_cumprod.to(samples.dtype)
    z = scheduler.add_noise(samples, noise, t)
    out = fake_unet(z, t, encoder_hidden_states=cond).sample
    a, s = acp[t].sqrt().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
    target = noise if scheduler.config.prediction_type == "epsilon" else a * noise - s * samples
    return ((out - target) ** 2).mean()
