"""Real sizes without weights: every preset's teacher and every paper reward at its published architecture (counted
against the published parameter counts), and one training step of every preset traced on the meta device at the
preset's own resolution and reward — what `rglcd plan` runs."""

import dataclasses

import pytest
import torch

from rglcd import architectures
from rglcd.architectures import PUBLISHED, build_teacher, parameter_count
from rglcd.config import load_config
from rglcd.lora import LCM_LORA_TARGETS
from rglcd.models import text_conditioning
from rglcd.plan import _build_on_meta, make_plan, memory_parts, trace_step
from rglcd.rewards import build_reward
from rglcd.rewards.latent import LATENT_RN50, LatentClip
from rglcd.train.build import build_distillation, build_student_reward, prepare_batch
from rglcd.train.forward import StepParts, training_forward

# Millions of parameters. Sources: the SD 1.5 / 2.1 counts are the "DiffusionWrapper has … M params" lines the
# original LDM code logs and the per-module counts of the diffusers checkpoints; SDXL's UNet 2,567,463,684; the
# OpenCLIP towers from open_clip's docs/model_profile.csv (ViT-H-14 986.11; ViT-L-14 image tower 303.97; ViT-bigG-14
# text 694.66 with its projection).
TEACHERS = {
    "SD15": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "SD21": {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39},
    "SDXL": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
}
REWARDS = {
    "hpsv2.1": 986.11,  # open_clip ViT-H-14
    "clipscore": 986.11,  # open_clip ViT-H-14
    "pickscore": 986.11,  # transformers CLIPModel of laion/CLIP-ViT-H-14 (the same tower pair)
    "aesthetic": 303.97,  # open_clip ViT-L-14 image tower + the 769-parameter linear head
    # Not published: ours, from ImageReward.py's module tree (BLIP ViT-L/16 303.30 M, BERT-base with cross-attention
    # 141.98 M, the unused contrastive projections 0.46 M, the MLP head 0.93 M); a regression value.
    "imagereward": 446.67,
}
PRESETS = ["sd15-512", "sd15-512-lora", "sd21-768", "sdxl-1024"]


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teachers_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        teacher = build_teacher(getattr(architectures, name))
    counted = {
        part: round(parameter_count(getattr(teacher, part)) / 1e6, 2) for part in TEACHERS[name]
    }  # fmt: skip
    assert counted == TEACHERS[name]
    assert teacher.vae_scale_factor == 8 and teacher.tokenizer.model_max_length == 77
    assert len(teacher.tokenizer) == 49408


def test_the_presets_teachers_are_known_offline():
    for preset in PRESETS:
        assert load_config(preset).model.teacher in PUBLISHED
    assert PUBLISHED["stabilityai/stable-diffusion-2-1"].scheduler["prediction_type"] == "v_prediction"
    assert {arch.resolution for arch in PUBLISHED.values()} == {512, 768, 1024}


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_rewards_have_their_published_sizes(name):
    with torch.device("meta"):
        reward = build_reward(name, random_weights=True)
    assert round(parameter_count(reward) / 1e6, 2) == REWARDS[name]
    assert not any(param.requires_grad for param in reward.parameters())


def test_the_official_latent_proxy_has_its_size():
    """Ji4chenLi/rg-lcd's latent_RN50: open_clip's ResNet-50 image tower on 4-channel 64² latents, ViT-H-14's text."""
    with torch.device("meta"):
        proxy = LatentClip(LATENT_RN50)
    assert round(parameter_count(proxy) / 1e6, 2) == 392.26
    assert tuple(proxy.clip.visual.attnpool.positional_embedding.shape) == (5, 2048)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_steps_at_its_resolution_on_the_meta_device(preset):
    """The preset's run built on the meta device (as `rglcd plan` builds it) and one RG-LCD step with its reward,
    forward and backward, at its own resolution: shapes, the guidance input, v-prediction, SDXL's conditions, LoRA."""
    config = load_config(preset, ["optim.batch_size=2"])
    run = _build_on_meta(config)
    student, teacher = run.networks.student, run.teacher
    resolution, side = config.data.resolution, config.data.resolution // 8
    with torch.device("meta"):
        batch = {"pixel_values": torch.zeros(2, 3, resolution, resolution), "captions": ["a cat", "a red car"]}
        _, _, added = prepare_batch(batch, teacher, torch.Generator(), resolution)
        uncond, uncond_added = text_conditioning(teacher, ["", ""], resolution)
        distillation = build_distillation(config, teacher, student)
        reward = build_student_reward(config, run.expert, None, teacher.vae, distillation)
        parts = StepParts(
            teacher, run.networks, distillation, reward, (uncond.float(), uncond_added), None, resolution, 1
        )
        output = training_forward(parts, batch, torch.Generator(), step=0).output
        output.loss.backward()
    assert output.model_pred.shape == output.target.shape == (2, 4, side, side)
    assert output.reward.shape == (2,)  # HPSv2.1 at its ViT-H-14 size, through the decoder
    trained = [param for param in student.parameters() if param.requires_grad]
    assert trained and all(param.grad is not None and param.grad.shape == param.shape for param in trained)
    assert teacher.schedule.prediction_type == ("v_prediction" if preset == "sd21-768" else "epsilon")
    if preset == "sdxl-1024":  # the pooled text embedding and the six size numbers
        assert added["text_embeds"].shape == (2, 1280) and added["time_ids"].shape == (2, 6)
    if config.lora.rank:  # every LCM-LoRA target is found in the real UNet, and there is no guidance input
        assert student.config.time_cond_proj_dim is None
        adapted = [name for name, _ in student.named_modules() if name.endswith(".lora_A")]
        for target in LCM_LORA_TARGETS:
            assert any(f".{target}.lora_A" in f".{name}" for name in adapted), target
    else:  # the student's guidance embedding w -> 256 -> the time embedding's input
        assert student.time_embedding.cond_proj.in_features == 256
        assert not any(param.requires_grad for param in run.networks.target.parameters())  # the frozen EMA target


def test_a_traced_step_records_its_phases_and_outputs():
    """The fake-tensor trace `rglcd plan` measures with, at SDXL's size (its largest): autocast dtypes included."""
    config = load_config("sdxl-1024", ["optim.batch_size=1"])
    trace = trace_step(_build_on_meta(config), config)
    assert trace.outputs["model_pred"] == ((1, 4, 128, 128), torch.float32)
    # The reward under SDXL's bf16 autocast with CUDA's rules (a GPU's plan): its norms and sums run in float32.
    assert trace.outputs["reward"] == ((1,), torch.float32)
    assert list(trace.phases)[:3] == [
        "encode the batch (VAE encoder, text encoders)", "forward: student, teacher, target, decoder and reward",
        "backward",
    ]  # fmt: skip
    assert trace.flops > 1e12 and trace.peak > max(trace.phases.values()) * 0.99


def test_gradient_checkpointing_lowers_the_traced_activations_and_costs_flops():
    """The student's, the VAE decoder's and the reward tower's activations are recomputed in the backward pass."""
    config = load_config("sd15-512", ["optim.batch_size=4"])
    without = dataclasses.replace(
        config, precision=dataclasses.replace(config.precision, gradient_checkpointing=False)
    )  # fmt: skip
    kept, recomputed = trace_step(_build_on_meta(without), without), trace_step(_build_on_meta(config), config)
    forward = "forward: student, teacher, target, decoder and reward"
    assert recomputed.phases[forward] < 0.3 * kept.phases[forward]
    assert recomputed.phases["backward"] < 0.6 * kept.phases["backward"]
    assert recomputed.flops > kept.flops


def test_a_plan_counts_every_part_of_a_full_student():
    config = load_config("sd21-768", ["optim.batch_size=1", "data.resolution=256"])
    plan = make_plan(config, processes=4, sharded=False)
    parts = {part.name: part.bytes for part in plan.parts}
    unet = 865_910_724 + 256 * 320  # the student's guidance projection: 256 -> the 320 sinusoid channels, no bias
    assert parts["student UNet"] == 4 * unet and parts["EMA target UNet"] == parts["student UNet"]
    assert parts["teacher UNet"] == 2 * 865_910_724  # fp16
    assert parts["optimizer states"] == 2 * parts["gradients"] == 2 * parts["student UNet"]
    assert parts["DDP gradient buckets"] == parts["gradients"]
    assert parts["reward: hpsv2.1"] == 4 * 986_109_441
    assert plan.total == sum(parts.values())
    sharded = {part.name: part.bytes for part in memory_parts(_build_on_meta(config), config, 4, sharded=True)}
    assert sharded["optimizer states"] == parts["optimizer states"] // 4
    assert sharded["student UNet"] == sharded["EMA target UNet"] == parts["student UNet"] // 4  # sharded alike
    assert "DDP gradient buckets" not in sharded
