"""Memory and speed switches: each takes effect in the run it is set for (the models a training step runs are
inspected inside it), pairwise combinations of them train on a CPU, and torch.compile trains and samples as the
eager models do.

The runs are in this process: accelerate's process-wide state, which fixes the mixed precision once per process,
is reset around each test.
"""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from rglcd.config import compile_unavailable, load_config
from rglcd.experiments.demo import tiny_setup
from rglcd.models import speed
from rglcd.train import loop, train

from .test_cli import run_main

# Every pair of values of any two switches appears in some row (6 rows for 3 × 2⁴ values, where all combinations
# are 48). The reward reads the student's own 2-step sample where checkpointing is on: the gradient goes back
# through checkpointed sampling steps.
PAIRWISE = [  # mixed precision, teacher dtype, gradient checkpointing, attention, channels-last
    ("no", "fp32", False, "sdpa", False),
    ("no", "bf16", True, "eager", True),
    ("bf16", "fp32", False, "eager", True),
    ("bf16", "bf16", True, "sdpa", False),
    ("fp16", "fp32", True, "sdpa", True),
    ("fp16", "bf16", False, "eager", False),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The student's activations under each mixed precision. accelerate runs no float16 autocast on a CPU: there
# precision.mixed_precision=fp16 trains in float32, and the run says so.
ACTIVATIONS = {
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16 if torch.cuda.is_available() else torch.float32,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=16)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run its own mixed precision, in one process; none left for the next test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def overrides(tiny, out, *more):
    return [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
        "optim.batch_size=2", "optim.max_train_steps=2", "logging.validation_steps=0", "logging.tracker=none",
        *more,
    ]  # fmt: skip


class Steps:
    """Each training forward of a run: its loss and sample, the dtype of the student's activations (its time
    embedding's first linear layer's output; unless ``activations`` is False: a hook would change what
    torch.compile compiles), and the models the step runs as they are then (:func:`built`)."""

    def __init__(self, monkeypatch, activations=True):
        self.models, self.losses, self.samples, self.activations = [], [], [], []
        forward = loop.training_forward

        def recorded(parts, *args):
            self.models.append(built(parts))
            linear = parts.networks.student.time_embedding.linear_1
            record = lambda module, inputs, output: self.activations.append(output.dtype)
            hook = linear.register_forward_hook(record) if activations else None
            try:
                result = forward(parts, *args)
            finally:
                if hook is not None:
                    hook.remove()
            self.losses.append(result.output.loss.detach().float())
            self.samples.append(result.output.sample)
            return result

        monkeypatch.setattr(loop, "training_forward", recorded)


def built(parts) -> dict[str, dict]:
    """Per model of a step (student, EMA target, teacher UNet, VAE, text encoder): its weights' dtypes, whether
    gradient checkpointing is on, its attention processors, whether its convolutions are channels-last (None
    without any whose two layouts differ), whether it is compiled (a VAE: its decoder; and its encoder)."""
    teacher = parts.teacher
    models = {
        "student": parts.networks.student, "target": parts.networks.target, "teacher": teacher.unet,
        "vae": teacher.vae, "text_encoder": teacher.text_encoder,
    }  # fmt: skip
    found = {}
    for name, model in models.items():
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        weights = [w for w in weights if not torch.empty(w.shape).is_contiguous(memory_format=torch.channels_last)]
        layouts = {(w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous()) for w in weights}
        compiled = getattr(model, "decoder", model)._compiled_call_impl is not None
        found[name] = {
            "dtypes": {p.dtype for p in model.parameters()},
            "checkpointing": getattr(model, "is_gradient_checkpointing", None),
            "processors": {type(p).__name__ for p in getattr(model, "attn_processors", {}).values()},
            "channels_last": {frozenset({(True, False)}): True, frozenset({(False, True)}): False}.get(
                frozenset(layouts), "mixed" if layouts else None
            ),
            "compiled": compiled,
        }
        if name == "vae":
            found[name]["encoder compiled"] = model.encoder._compiled_call_impl is not None
    return found


@pytest.mark.parametrize("mixed,teacher_dtype,checkpointing,attention,channels_last", PAIRWISE)
def test_switches_take_effect_and_train(tiny, tmp_path, monkeypatch, caplog, mixed, teacher_dtype, checkpointing,
                                        attention, channels_last):  # fmt: skip
    """Two finite updates, checkpointed every step, with each switch visible in the models the steps ran: the
    student's float32 master weights and its activations in the mixed precision, the frozen teacher UNet, VAE and
    text encoder in precision.teacher_dtype (the EMA target float32), checkpointing on the student and the VAE,
    the UNets' attention processor, the channels-last layout of the UNets' and the VAE's convolutions."""
    steps = Steps(monkeypatch)
    switches = [
        f"precision.mixed_precision={mixed}", f"precision.teacher_dtype={teacher_dtype}",
        f"precision.gradient_checkpointing={checkpointing}", f"precision.attention={attention}",
        f"precision.channels_last={channels_last}", "logging.checkpointing_steps=1",
        *(["reward.target=sample", "reward.grad_steps=2"] if checkpointing else []),
    ]  # fmt: skip
    train(load_config("tiny", overrides(tiny, tmp_path, *switches)))
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 2
    assert len(steps.losses) == 2 and all(torch.isfinite(loss) for loss in steps.losses)  # no update skipped
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert steps.activations and set(steps.activations) == {ACTIVATIONS[mixed]}
    ignored = "precision.mixed_precision=fp16 does nothing on the CPU (it trains in float32); use bf16"
    assert (ignored in caplog.text) == (mixed == "fp16" and not torch.cuda.is_available())
    assert all((sample is not None) == checkpointing for sample in steps.samples)  # reward.target=sample
    processor = "AttnProcessor" if attention == "eager" else "AttnProcessor2_0"
    for models in steps.models:  # as built, and still so at the second step (after a checkpoint)
        dtypes = {name: model["dtypes"] for name, model in models.items()}
        frozen = {DTYPES[teacher_dtype]}
        assert dtypes == {"student": {torch.float32}, "target": {torch.float32}, "teacher": frozen, "vae": frozen,
                          "text_encoder": frozen}  # fmt: skip
        assert models["student"]["checkpointing"] == models["vae"]["checkpointing"] == checkpointing
        assert not models["target"]["checkpointing"] and not models["teacher"]["checkpointing"]  # (no backward)
        unets = ("student", "target", "teacher")  # (the VAE's attention is sdpa either way)
        assert {name: models[name]["processors"] for name in unets} == {name: {processor} for name in unets}
        assert {name: model["channels_last"] for name, model in models.items()} == {
            "student": channels_last, "target": channels_last, "teacher": channels_last, "vae": channels_last,
            "text_encoder": None,
        }  # fmt: skip
        assert not any(model["compiled"] for model in models.values())


def test_compiled_training_and_sampling_match_eager(tiny, tmp_path, monkeypatch):
    """precision.compile wraps the student, the EMA target, the teacher UNet and the VAE's decoder (not its encoder)
    in torch.compile, `rglcd sample --compile` the UNet and the VAE's decoder; the updates and the images are the
    eager ones up to float rounding."""
    if compile_unavailable():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++ or clang++)")
    summaries, samples = {}, {}
    sped_up, speed_up = [], speed.speed_up  # the models `rglcd sample` speeds up (training's are built.py's own name)
    monkeypatch.setattr(speed, "speed_up", lambda model, *flags: (sped_up.append(model), speed_up(model, *flags)))
    for name, compiled in (("eager", False), ("compiled", True)):
        steps = Steps(monkeypatch, activations=False)
        train(load_config("tiny", overrides(tiny, tmp_path / name, f"precision.compile={compiled}")))
        models = steps.models[0]
        assert {name: model["compiled"] for name, model in models.items()} == {
            "student": compiled, "target": compiled, "teacher": compiled, "vae": compiled, "text_encoder": False
        }  # fmt: skip
        assert not models["vae"]["encoder compiled"]  # the VAE's decoder only
        summaries[name] = json.loads((tmp_path / name / "train_summary.json").read_text())["parameter_checksums"]
        sample = ["sample", "--model", tmp_path / name / "student", "--prompt", "a red", "--steps", "2"]
        sped_up.clear()
        run_main(*sample, "--out", tmp_path / f"{name}-samples", *(["--compile"] if compiled else []))
        models = {type(model).__name__: model for model in sped_up}
        assert models.keys() == {"UNet2DConditionModel", "AutoencoderKL"}
        unet, vae = models["UNet2DConditionModel"], models["AutoencoderKL"]
        assert (unet._compiled_call_impl is not None) == (vae.decoder._compiled_call_impl is not None) == compiled
        samples[name] = np.asarray(Image.open(tmp_path / f"{name}-samples" / "000-00.png"), dtype=int)
    for part, checksum in summaries["eager"].items():  # the same updates, up to the fused kernels' float rounding
        assert summaries["compiled"][part] == pytest.approx(checksum, rel=1e-7)
    assert np.abs(samples["compiled"] - samples["eager"]).max() <= 1
