"""SDXL teachers: two text encoders, the pooled embedding and size conditioning, in the step, training and sampling."""

import numpy as np
import pytest
import torch

from rglcd.config import load_config
from rglcd.experiments.demo import tiny_setup
from rglcd.losses import ConsistencyDistance
from rglcd.models import build_student, build_target, load_teacher, reward_input, sdxl_time_ids, text_conditioning
from rglcd.rewards import build_reward
from rglcd.sampling import consistency_scheduler, lcm_sample, to_pil
from rglcd.serve import ServeSettings, check_request, generate, load_models
from rglcd.step import Distillation, SampleTarget, StepNoise, StepReward, rglcd_step
from rglcd.tiny import save_tiny_pipeline

from .test_cli import run_main

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "teacher", sdxl=True)


def colorfulness(beta):
    """The β-weighted reward as training builds it: a mix of one term."""
    return build_reward("mix", terms=[{"name": "colorfulness", "beta": beta}])


def test_sdxl_conditioning_matches_the_pipelines(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    teacher = load_teacher(sdxl_dir)
    assert teacher.is_sdxl
    embeds, added = text_conditioning(teacher, [*PROMPTS, ""], resolution=32)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    reference, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds[:2], reference)  # [B, 16, 32 + 32]
    torch.testing.assert_close(added["text_embeds"][:2], pooled)  # [B, 24]
    assert not embeds[2].any() and not added["text_embeds"][2].any()  # the empty prompt is zeros, as SDXL's
    assert added["time_ids"].tolist() == sdxl_time_ids(3, 32, 32).tolist() == [[32, 32, 0, 0, 32, 32]] * 3


def test_sdxl_step_uses_the_added_conditions_and_trains_the_student(sdxl_dir):
    teacher = load_teacher(sdxl_dir)
    student = build_student(teacher.unet)
    target = build_target(student)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond, added = text_conditioning(teacher, PROMPTS, 32)
    uncond, uncond_added = text_conditioning(teacher, ["", ""], 32)
    distillation = Distillation(teacher.schedule, distance=ConsistencyDistance("huber"))
    noise = StepNoise.draw(latents, distillation, generator)
    common = dict(
        student=student, target=target, teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond, noise=noise, prompts=PROMPTS,
        reward=StepReward(colorfulness(0.5), reward_input(teacher.vae)), uncond_added_cond=uncond_added,
    )  # fmt: skip
    output = rglcd_step(**common, added_cond=added)
    output.loss.backward()
    assert torch.isfinite(output.loss) and student.add_embedding.linear_1.weight.grad is not None
    moved = {**added, "time_ids": added["time_ids"] * 2}  # another size conditioning changes the prediction
    assert not torch.allclose(rglcd_step(**common, added_cond=moved).model_pred, output.model_pred)


def test_sdxl_sampler_reward_samples_with_the_added_conditions(sdxl_dir):
    teacher = load_teacher(sdxl_dir)
    student = build_student(teacher.unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond, added = text_conditioning(teacher, PROMPTS, 32)
    uncond, uncond_added = text_conditioning(teacher, ["", ""], 32)
    distillation = Distillation(teacher.schedule, distance=ConsistencyDistance("huber"))
    common = dict(
        student=student, target=build_target(student), teacher_unet=teacher.unet, distillation=distillation,
        latents=latents, cond_embeds=cond, uncond_embeds=uncond,
        noise=StepNoise.draw(latents, distillation, generator, sample_steps=2), prompts=PROMPTS,
        reward=StepReward(
            colorfulness(0.5), reward_input(teacher.vae), SampleTarget(distillation.sampling_timesteps(2))
        ),
        uncond_added_cond=uncond_added,
    )  # fmt: skip
    output = rglcd_step(**common, added_cond=added)
    output.loss.backward()
    assert output.sample.shape == latents.shape and student.add_embedding.linear_1.weight.grad is not None
    moved = {**added, "time_ids": added["time_ids"] * 2}
    assert not torch.allclose(rglcd_step(**common, added_cond=moved).sample, output.sample)


def test_sdxl_training_exports_a_diffusers_sdxl_lcm_pipeline(sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline, TCDScheduler

    tiny = tiny_setup(tmp_path / "tiny", samples=16)
    out = tmp_path / "run"
    overrides = [
        f"model.teacher={sdxl_dir}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
        "optim.batch_size=2", "optim.max_train_steps=2", "logging.validation_steps=2", "logging.tracker=none",
    ]  # fmt: skip
    run_main("train", "tiny", *overrides)
    assert load_config(out / "config.yaml").model.teacher == str(sdxl_dir)
    pipe = DiffusionPipeline.from_pretrained(out / "student")
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 256
    # diffusers' SDXL pipeline feeds the guidance embedding and no CFG to such a UNet: the same images as ours.
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=6.0, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    ours = lcm_sample(
        pipe.unet, pipe.vae, pipe, pipe.scheduler, PROMPTS, num_steps=2, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (out / "validation" / "step-00000002.png").is_file()
    # With TCD as diffusers' documentation swaps it in: the same images as our TCD sampling.
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=6.0, eta=0.3, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    ours = lcm_sample(
        pipe.unet, pipe.vae, pipe, consistency_scheduler(pipe.scheduler.config, "tcd"), PROMPTS, num_steps=2,
        guidance_scale=6.0, eta=0.3, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    # rglcd serve loads the SDXL student and teacher and samples them as our sampler does.
    models, _ = load_models(ServeSettings([f"student={out / 'student'}", f"teacher={sdxl_dir}"]))
    request = check_request(models, PROMPTS[0], seed=1, steps=2, guidance=6.0, scheduler="tcd", eta=0.3,
                            teacher_steps=2, teacher_guidance=5.0)  # fmt: skip
    student, teacher = generate(models, request)
    ours = lcm_sample(
        pipe.unet, pipe.vae, pipe, consistency_scheduler(pipe.scheduler.config, "tcd"), PROMPTS[:1], num_steps=2,
        guidance_scale=6.0, eta=0.3, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert np.array_equal(np.asarray(student.image), np.asarray(to_pil(ours)[0]))
    assert teacher.label == "teacher" and teacher.steps == 2 and teacher.image.size == student.image.size


def test_sdxl_training_from_a_cache_matches_training_from_the_images(sdxl_dir, tmp_path):
    """An SDXL cache holds both encoders' embeddings and the pooled one (the empty prompt's all zeros): training
    from it, caption dropout included, gives the student training from the images gives."""
    from safetensors.torch import load_file

    from rglcd.data import DataError
    from rglcd.data.cache import check_cache, teacher_fingerprint, write_cache
    from rglcd.train import train

    tiny = tiny_setup(tmp_path / "tiny", samples=16)
    cache = write_cache(sdxl_dir, tiny / "data", tmp_path / "cache", resolution=32, progress=False)
    teacher = load_teacher(sdxl_dir)
    info = check_cache(cache, teacher_fingerprint(teacher), 32)
    embeds, added = text_conditioning(teacher, ["x"], 32)
    assert info["prompt_embeds_shape"] == list(embeds.shape[1:])
    assert info["pooled_prompt_embeds_shape"] == list(added["text_embeds"].shape[1:])
    assert set(info["fingerprint"]) == {"vae", "text_encoder", "text_encoder_2"}
    uncond = load_file(cache / "uncond.safetensors")
    assert not uncond["prompt_embeds"].any() and not uncond["pooled_prompt_embeds"].any()

    runs = {}
    for name, source in (("images", tiny / "data"), ("cached", cache)):
        runs[name] = tmp_path / name
        train(load_config("tiny", [
            f"model.teacher={sdxl_dir}", f"data.source={source}", f"logging.output_dir={runs[name]}",
            "optim.batch_size=4", "optim.max_train_steps=3", "logging.validation_steps=0", "logging.tracker=none",
            "data.shuffle_buffer=0", "data.caption_dropout=0.5",
        ]))  # fmt: skip
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    from_images, from_cache = load_file(runs["images"] / weights), load_file(runs["cached"] / weights)
    for key in from_images:
        torch.testing.assert_close(from_cache[key], from_images[key], atol=1e-5, rtol=0, msg=key)
    with pytest.raises(DataError, match="text encoder 2 differ"):  # an SD teacher has no second encoder
        check_cache(cache, teacher_fingerprint(load_teacher(tiny / "teacher")), 32)


def test_sdxl_preset_parses():
    config = load_config("sdxl-1024")
    assert config.data.resolution == 1024 and config.model.teacher == "stabilityai/stable-diffusion-xl-base-1.0"


def test_sdxl_lora_loads_onto_the_sdxl_pipeline(sdxl_dir, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    tiny = tiny_setup(tmp_path / "tiny", samples=16)
    out = tmp_path / "run"
    overrides = [
        f"model.teacher={sdxl_dir}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}", "lora.rank=4",
        "optim.batch_size=2", "optim.max_train_steps=2", "logging.validation_steps=0", "logging.tracker=none",
    ]  # fmt: skip
    run_main("train", "tiny", *overrides)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    before = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    pipe.load_lora_weights(out / "lora")
    after = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    assert torch.isfinite(after).all() and not torch.equal(before, after)  # the trained adapters took effect
