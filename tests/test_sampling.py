import pytest
import torch
from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler

from rglcd.export import export_pipeline, load_lcm
from rglcd.models import TeacherLoadError, build_student, load_teacher
from rglcd.sampling import lcm_sample

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
