import json
import shutil

import pytest
import torch

from rglcd.models import (
    TeacherLoadError,
    build_student,
    build_target,
    decode_latents,
    encode_prompts,
    load_teacher,
    update_ema,
)
from rglcd.tiny import build_tiny_pipeline


def test_load_teacher_from_local_folder(teacher_dirs):
    teacher = load_teacher(teacher_dirs["v_prediction"])
    assert teacher.schedule.prediction_type == "v_prediction"
    assert teacher.vae_scale_factor == 4
    assert teacher.scheduler_config["beta_schedule"] == "scaled_linear"
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_folder_without_index_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherLoadError, match=r"no model_index\.json"):
        load_teacher(tmp_path)


def test_uncached_hub_id_is_a_clear_error():
    with pytest.raises(TeacherLoadError, match="could not read the pipeline index"):
        load_teacher("nobody/not-a-cached-model")


def test_missing_component_is_named(tmp_path, epsilon_teacher_dir):
    broken = shutil.copytree(epsilon_teacher_dir, tmp_path / "broken")
    index = json.loads((broken / "model_index.json").read_text())
    del index["vae"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherLoadError, match="lacks vae"):
        load_teacher(broken)
    shutil.rmtree(broken / "unet")
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherLoadError, match="'unet' component"):
        load_teacher(broken)


def test_student_starts_as_the_teacher_for_every_w(epsilon_teacher_dir):
    teacher = load_teacher(epsilon_teacher_dir)
    student = build_student(teacher.unet, time_cond_proj_dim=256)
    assert student.config.time_cond_proj_dim == 256
    assert teacher.unet.config.time_cond_proj_dim is None
    assert all(p.requires_grad for p in student.parameters()) and student.training
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 19])
    cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, ["a red circle", "a blue square"])
    with torch.no_grad():
        expected = teacher.unet(z, t, encoder_hidden_states=cond).sample
        for w in (torch.zeros(2, 256), torch.randn(2, 256)):
            torch.testing.assert_close(student(z, t, encoder_hidden_states=cond, timestep_cond=w).sample, expected)
    # The student is a copy: training it leaves the teacher untouched.
    assert student.conv_in.weight.data_ptr() != teacher.unet.conv_in.weight.data_ptr()


def test_teacher_with_guidance_embedding_is_reused():
    unet = build_tiny_pipeline(time_cond_proj_dim=32).unet
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    student = build_student(unet, time_cond_proj_dim=256)
    assert student.config.time_cond_proj_dim == 32
    assert torch.equal(student.time_embedding.cond_proj.weight, unet.time_embedding.cond_proj.weight)


def test_target_is_frozen_copy_and_ema_update_is_exact():
    online = torch.nn.Linear(2, 1)
    target = build_target(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        target.weight.copy_(torch.tensor([[3.0, -1.0]]))
    update_ema(target.parameters(), online.parameters(), decay=0.95)
    torch.testing.assert_close(target.weight, torch.tensor([[0.95 * 3 + 0.05 * 1, 0.95 * -1 + 0.05 * 2]]))
    update_ema(target.parameters(), online.parameters(), decay=0.0)
    assert torch.equal(target.weight, online.weight)


def test_ema_update_gives_the_same_values_as_a_loop_over_parameters():
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(shape, generator=generator) for shape in [(3, 5), (7,), (2, 2, 3)]]
    onlines = [torch.randn(t.shape, generator=generator, requires_grad=True) for t in targets]
    expected = [t.clone().mul_(0.95).add_(o.detach(), alpha=0.05) for t, o in zip(targets, onlines, strict=True)]
    update_ema(targets, onlines, decay=0.95)
    assert all(torch.equal(t, e) for t, e in zip(targets, expected, strict=True))
    with pytest.raises(ValueError, match="3 target parameters but 2"):
        update_ema(targets, onlines[:2], decay=0.95)


def test_overlong_captions_are_truncated_and_decoding_in_micro_batches_is_the_same(epsilon_teacher_dir):
    from rglcd.models import decode_latents

    teacher = load_teacher(epsilon_teacher_dir)
    embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, ["a red circle " * 100, ""])
    assert embeds.shape == (2, teacher.tokenizer.model_max_length, 32)
    latents = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        whole = decode_latents(teacher.vae, latents)
        torch.testing.assert_close(decode_latents(teacher.vae, latents, batch_size=2), whole, atol=1e-5, rtol=0)
    assert whole.shape == (5, 3, 32, 32) and whole.min() >= 0 and whole.max() <= 1


def test_a_unet_config_without_time_cond_proj_dim_still_gets_the_guidance_input(epsilon_teacher_dir, tmp_path):
    """SD 1.5's unet/config.json predates the key, and diffusers' from_config drops a key the loaded config lacked
    when it comes in the config dict: the student once got no guidance input from the real SD 1.5 checkpoint."""
    folder = shutil.copytree(epsilon_teacher_dir, tmp_path / "teacher")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("time_cond_proj_dim")
    config_file.write_text(json.dumps(config))
    student = build_student(load_teacher(folder).unet, time_cond_proj_dim=16)
    assert student.config.time_cond_proj_dim == 16 and student.time_embedding.cond_proj.in_features == 16


def test_checkpointing_the_decoder_keeps_the_rewards_gradient(epsilon_teacher_dir):
    from rglcd.rewards import build_reward

    teacher = load_teacher(epsilon_teacher_dir)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reward = build_reward("colorfulness")

    def gradient() -> torch.Tensor:
        latents.grad = None
        reward(decode_latents(teacher.vae, latents), ["a", "b"]).sum().backward()
        return latents.grad.clone()

    kept = gradient()
    teacher.vae.enable_gradient_checkpointing()
    assert teacher.vae.decoder.gradient_checkpointing
    torch.testing.assert_close(gradient(), kept, rtol=1e-6, atol=1e-8)


def test_one_move_casts_each_part_on_its_way(epsilon_teacher_dir, monkeypatch):
    """Teacher.to(device, dtype): one Module.to per part with both (each weight cast as it moves), never a move and
    then a cast, which would put the whole float32 model on the GPU first."""
    calls = []
    original = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        calls.append((type(self).__name__, args, kwargs))
        return original(self, *args, **kwargs)

    teacher = load_teacher(epsilon_teacher_dir)
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    teacher.to("meta", torch.float16)
    assert [(name, args) for name, args, _ in calls] == [
        ("UNet2DConditionModel", ("meta", torch.float16)),
        ("CLIPTextModel", ("meta", torch.float16)),
        ("AutoencoderKL", ("meta", torch.float16)),  # SD layout: its VAE runs in float16 as its pipelines run it
    ]
    assert {
        (p.device.type, p.dtype) for module in (teacher.unet, *teacher.encoders()) for p in module.parameters()
    } == {("meta", torch.float16)}


def test_an_sdxl_vae_stays_float32_under_float16_and_decodes_outside_autocast(tmp_path):
    """SDXL's VAE overflows float16 (NaN rewards, then the NaN stop): kept in float32 as diffusers' SDXL pipelines
    keep it (force_upcast), and its decode inside the step's float16 autocast runs in float32."""
    from rglcd.tiny import save_tiny_pipeline

    teacher = load_teacher(save_tiny_pipeline(tmp_path / "sdxl", sdxl=True)).to("cpu", torch.float16)
    assert teacher.vae.config.force_upcast and teacher.vae.dtype == torch.float32
    assert teacher.unet.dtype == teacher.text_encoder_2.dtype == torch.float16
    seen = []
    teacher.vae.decoder.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    latents = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        images = decode_latents(teacher.vae, latents)
    assert seen == [torch.float32] and images.dtype == torch.float32 and torch.isfinite(images).all()


def test_compiling_raises_the_recompile_limit(epsilon_teacher_dir):
    """Student, target and teacher share UNet2DConditionModel.forward's code object: its variants exceed torch's
    default of 8 compiled versions, after which the rest would silently run eagerly."""
    import torch._dynamo.config as dynamo

    from rglcd.models import speed_up

    # torch's own patch, which restores the setting: monkeypatch would delete it on undo (the module's settings are
    # not in its __dict__), hiding it from every later test in the process.
    with dynamo.patch(recompile_limit=8):
        speed_up(load_teacher(epsilon_teacher_dir).unet, compile=True)  # compiles lazily: nothing runs here
        assert dynamo.recompile_limit == 64
