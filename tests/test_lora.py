"""LoRA RG-LCD: only the adapters train, the EMA target is an adapter, the export loads with load_lora_weights
(exact resume of a LoRA run: tests/test_resume.py)."""

import re

import pytest
import torch
from safetensors.torch import load_file

from rglcd.config import ConfigError, load_config
from rglcd.experiments.demo import tiny_setup
from rglcd.export import load_lcm
from rglcd.lora import STUDENT, AdaptersOff, AdapterView, adapter_pairs, add_lora
from rglcd.models import load_teacher, update_ema
from rglcd.sampling import lcm_sample, lcm_scheduler
from rglcd.train import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=48)


def unet_inputs(unet, generator):
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    embeds = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([999, 499]), embeds


def test_teacher_target_and_ema_views_of_one_unet(tiny):
    teacher = load_teacher(tiny / "teacher")
    generator = torch.Generator().manual_seed(0)
    latents, timesteps, embeds = unet_inputs(teacher.unet, generator)
    with torch.no_grad():
        before = teacher.unet(latents, timesteps, encoder_hidden_states=embeds).sample
    unet = add_lora(teacher.unet, rank=4)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name and ".default." in name for name in trainable)
    target, online = adapter_pairs(unet)
    assert len(target) == len(online) == len(trainable)
    assert all(torch.equal(t, o) for t, o in zip(target, online, strict=True))
    with torch.no_grad():
        for param in online:
            param.add_(0.1 * torch.randn(param.shape, generator=generator))  # the adapters have learned
        student = unet(latents, timesteps, encoder_hidden_states=embeds).sample
        off = AdaptersOff(unet)(latents, timesteps, encoder_hidden_states=embeds).sample
        ema_view = AdapterView(unet)(latents, timesteps, encoder_hidden_states=embeds).sample
    assert torch.equal(off, before)  # adapters off: exactly the teacher
    assert not torch.allclose(student, before) and torch.equal(ema_view, before)  # the EMA adapter is still at 0·B
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == trainable  # views restore the state
    initial = [t.clone() for t in target]
    update_ema(target, online, 0.75)
    assert all(torch.equal(t, 0.75 * i + 0.25 * o) for t, i, o in zip(target, initial, online, strict=True))


def test_lora_run_trains_only_adapters_and_exports_for_load_lora_weights(tiny, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = tmp_path / "run"
    overrides = [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
        "optim.batch_size=4", "optim.max_train_steps=3", "logging.checkpointing_steps=3",
        "logging.validation_steps=3", "lora.rank=4", "lora.alpha=16", "lora.fuse_on_export=true",
        "distill.ema_decay=0.5",
    ]  # fmt: skip
    assert train(load_config("tiny", overrides)) == out / "student"
    checkpoint = out / "checkpoints" / "checkpoint-3"
    state = load_file(checkpoint / "model.safetensors")
    teacher = load_teacher(tiny / "teacher")
    # Adapters only (the frozen base is the teacher's), and only the trained adapter has optimizer states.
    assert state and all(".lora_" in key for key in state)
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    assert len(optimizer_state) == sum(f".{STUDENT}." in key for key in state) == len(state) // 2
    online, ema = (
        load_file(out / "lora" / "pytorch_lora_weights.safetensors"),
        load_file(out / "target_lora" / "pytorch_lora_weights.safetensors"),
    )
    assert online.keys() == ema.keys() and any(not torch.equal(online[k], ema[k]) for k in online)

    # The adapters on the teacher's own pipeline with an LCMScheduler sample as the trained student does.
    pipe = StableDiffusionPipeline.from_pretrained(tiny / "teacher", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(out / "lora")
    prompts, seed = ["a red picture", "a blue picture"], 3
    loaded = pipe(prompts, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    student = add_lora(teacher.unet, rank=4, alpha=16)  # alpha ≠ rank: the export must keep the scaling
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and not any(".lora_" in key for key in missing)
    ours = lcm_sample(student, teacher.vae, teacher, lcm_scheduler(teacher.scheduler_config), prompts, num_steps=2,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
    torch.testing.assert_close(ours, loaded, atol=1e-6, rtol=0)
    fused = load_lcm(out / "student")  # the fused export is an LCM pipeline as `rglcd sample` / `rglcd eval` load it
    assert isinstance(fused.scheduler, LCMScheduler)
    from_fused = fused(prompts, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                       generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    torch.testing.assert_close(from_fused, loaded, atol=1e-4, rtol=0)  # fusing only reorders the float sums
    # Both exports carry a model card whose loading example runs as written.
    for folder in (out / "lora", out / "student"):
        card = (folder / "README.md").read_text()
        assert "| student | LoRA adapters, rank 4, alpha 16 |" in card and "guidance_scale=1" in card
        namespace = {}
        exec(re.search(r"```python\n(.*?)```", card, re.S)[1], namespace)
        assert namespace["image"].size == (32, 32)
    assert "load_lora_weights" in (out / "lora" / "README.md").read_text()


def test_lora_options_are_validated(tiny, tmp_path):
    base = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*base, "lora.rank=-1", "lora.fuse_on_export=true", "lora.dropout=1.5"])
    text = str(error.value)
    assert "lora.rank: must be >= 0" in text and "lora.dropout: must be in [0, 1)" in text
    assert "lora.fuse_on_export: only for LoRA runs" in text


def test_the_ema_target_is_deterministic_under_lora_dropout(tiny):
    unet = add_lora(load_teacher(tiny / "teacher").unet, rank=4, dropout=0.5)
    target, _ = adapter_pairs(unet)
    with torch.no_grad():
        for param in target:
            param.add_(0.1)  # a non-zero EMA adapter, so that dropout would show
        latents, timesteps, embeds = unet_inputs(unet, torch.Generator().manual_seed(0))
        first, second = (AdapterView(unet)(latents, timesteps, encoder_hidden_states=embeds).sample for _ in range(2))
    assert torch.equal(first, second) and unet.training  # and the student is back in training mode
