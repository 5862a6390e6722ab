import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
)

from rglcd.export import export_pipeline, load_lcm
from rglcd.models import TeacherLoadError, build_student, load_teacher, place
from rglcd.models.speed import sampling_dtype
from rglcd.sampling import consistency_scheduler, ddim_cfg_sample, ddim_scheduler, lcm_sample
from rglcd.tiny import save_tiny_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def exported(request, teacher_dirs, tmp_path_factory):
    teacher = load_teacher(teacher_dirs[request.param])
    student = build_student(teacher.unet)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    out = export_pipeline(tmp_path_factory.mktemp("export") / "student", student, teacher)
    return out, request.param


def test_export_loads_in_plain_diffusers(exported):
    out, prediction_type = exported
    assert not out.with_name(out.name + ".partial").exists()
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, LatentConsistencyModelPipeline)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert pipeline.scheduler.config.prediction_type == prediction_type
    assert pipeline.scheduler.config.original_inference_steps == 50
    assert pipeline.scheduler.config.clip_sample is False
    assert pipeline.unet.config.time_cond_proj_dim == 256
    expected_timesteps = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259]}
    for steps, timesteps in expected_timesteps.items():
        pipeline.scheduler.set_timesteps(steps)
        assert pipeline.scheduler.timesteps.tolist() == timesteps
        images = pipeline(PROMPTS[:1], num_inference_steps=steps, output_type="pt").images
        assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_own_sampling_equals_diffusers_lcm_pipeline(exported, steps):
    pipeline = DiffusionPipeline.from_pretrained(exported[0])
    ours = lcm_sample(
        pipeline.unet, pipeline.vae, pipeline, pipeline.scheduler, PROMPTS,
        num_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    theirs = pipeline(
        PROMPTS, num_inference_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(11),
        output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # and the seed matters
    other = lcm_sample(
        pipeline.unet, pipeline.vae, pipeline, pipeline.scheduler, PROMPTS,
        num_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(12),
    )  # fmt: skip
    assert not torch.allclose(ours, other)


@pytest.mark.parametrize("steps,eta", [(1, 0.3), (2, 0.0), (4, 0.3), (4, 1.0)])
def test_tcd_sampling_equals_diffusers_pipeline_with_tcd_scheduler(exported, steps, eta):
    """The export with diffusers' TCDScheduler: StableDiffusionPipeline passes TCD's eta (γ) to the scheduler and
    feeds the guidance embedding (diffusers' LCM pipeline passes eta=None, which TCD cannot take)."""
    tcd = TCDScheduler.from_pretrained(exported[0], subfolder="scheduler")  # as docs/method.md loads it
    pipeline = StableDiffusionPipeline.from_pretrained(exported[0], scheduler=tcd, safety_checker=None)
    common = dict(num_steps=steps, guidance_scale=6.0, eta=eta)
    scheduler = consistency_scheduler(pipeline.scheduler.config, "tcd")
    assert isinstance(scheduler, TCDScheduler) and scheduler.config.original_inference_steps == 50
    ours = lcm_sample(
        pipeline.unet, pipeline.vae, pipeline, scheduler, PROMPTS, generator=torch.Generator().manual_seed(11), **common
    )
    theirs = pipeline(
        PROMPTS, num_inference_steps=steps, guidance_scale=6.0, eta=eta, generator=torch.Generator().manual_seed(11),
        output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    lcm = lcm_sample(
        pipeline.unet, pipeline.vae, pipeline, consistency_scheduler(pipeline.scheduler.config, "lcm"), PROMPTS,
        generator=torch.Generator().manual_seed(11), **common,
    )  # fmt: skip
    assert not torch.allclose(ours, lcm, atol=1e-4)  # TCD is not LCM's sampling
    if steps > 1:  # γ matters from the second step on
        other = consistency_scheduler(pipeline.scheduler.config, "tcd")
        moved = lcm_sample(
            pipeline.unet, pipeline.vae, pipeline, other, PROMPTS, generator=torch.Generator().manual_seed(11),
            **{**common, "eta": 0.6},
        )  # fmt: skip
        assert not torch.allclose(ours, moved, atol=1e-4)


def test_export_replaces_previous_export(exported, teacher_dirs):
    out, prediction_type = exported
    teacher = load_teacher(teacher_dirs[prediction_type])
    student = build_student(teacher.unet)
    export_pipeline(out, student, teacher)
    reloaded = DiffusionPipeline.from_pretrained(out)
    assert torch.equal(
        reloaded.unet.time_embedding.cond_proj.weight, torch.zeros_like(student.time_embedding.cond_proj.weight)
    )


def test_load_lcm_rejects_a_teacher(epsilon_teacher_dir):
    with pytest.raises(TeacherLoadError, match="no guidance embedding"):
        load_lcm(epsilon_teacher_dir)


def test_sampling_dtype_is_bf16_on_a_gpu_and_fp32_elsewhere_unless_given():
    assert sampling_dtype(None, "cuda") == sampling_dtype(None, torch.device("cuda", 1)) == torch.bfloat16
    assert sampling_dtype(None, "cpu") == sampling_dtype(None, "meta") == torch.float32
    assert sampling_dtype("fp16", "cpu") == torch.float16 and sampling_dtype("fp32", "cuda") == torch.float32
    assert sampling_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp8: not a sampling dtype; choose fp16, bf16, fp32"):
        sampling_dtype("fp8", "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_sample_on_the_cpu_is_finite_and_close_to_float32(exported, dtype):
    reference = load_lcm(exported[0])
    common = dict(num_steps=2, guidance_scale=6.0)
    expected = lcm_sample(reference.unet, reference.vae, reference, reference.scheduler, PROMPTS,
                          generator=torch.Generator().manual_seed(11), **common)  # fmt: skip
    pipeline = load_lcm(exported[0])
    place(pipeline, torch.device("cpu"), dtype)
    assert pipeline.unet.dtype == pipeline.text_encoder.dtype == pipeline.vae.dtype == dtype  # an SD-layout VAE
    images = lcm_sample(pipeline.unet, pipeline.vae, pipeline, pipeline.scheduler, PROMPTS,
                        generator=torch.Generator().manual_seed(11), **common)  # fmt: skip
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert not torch.equal(images, expected)  # it did run in the lower precision
    torch.testing.assert_close(images, expected, atol=0.05, rtol=0)  # the same picture


@pytest.fixture(scope="module")
def sdxl_teacher_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "teacher", sdxl=True)


def test_sdxls_force_upcast_vae_decodes_in_float32_under_fp16(sdxl_teacher_dir):
    teacher = load_teacher(sdxl_teacher_dir)
    assert teacher.vae.config.force_upcast  # AutoencoderKL's default, and SDXL's config
    place(teacher, torch.device("cpu"), torch.float16)
    assert teacher.unet.dtype == teacher.text_encoder.dtype == teacher.text_encoder_2.dtype == torch.float16
    assert teacher.vae.dtype == torch.float32
    decoded = []
    teacher.vae.post_quant_conv.register_forward_pre_hook(lambda module, inputs: decoded.append(inputs[0].dtype))
    images = ddim_cfg_sample(teacher.unet, teacher.vae, teacher, ddim_scheduler(teacher.scheduler_config), PROMPTS,
                             num_steps=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert decoded == [torch.float32]  # the fp16 latents were cast up for the decode
    # An fp16-safe VAE (the flag off: SDXL's fp16-fix) keeps the pipeline's dtype; under bf16 the VAE stays whole.
    fixed = load_teacher(sdxl_teacher_dir)
    fixed.vae.register_to_config(force_upcast=False)
    place(fixed, torch.device("cpu"), torch.float16)
    assert fixed.vae.dtype == torch.float16
    bf16 = load_teacher(sdxl_teacher_dir)
    place(bf16, torch.device("cpu"), torch.bfloat16)
    assert bf16.vae.dtype == torch.float32 and bf16.unet.dtype == torch.bfloat16
    sd = load_teacher(sdxl_teacher_dir)
    sd.text_encoder_2 = None  # an SD layout: its pipelines never upcast the VAE, whatever the flag says
    place(sd, torch.device("cpu"), torch.float16)
    assert sd.vae.dtype == torch.float16
