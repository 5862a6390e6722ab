"""Memory and speed switches together: every precision pair with checkpointing/attention/channels-last variants trains
on a CPU; torch.compile trains and samples as the eager models do.

Each run is its own process (`rglcd train`): accelerate fixes the mixed precision once per process.
"""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from rglcd.config import compile_unavailable
from rglcd.experiments.demo import tiny_setup

from .test_cli import rglcd

COMBINATIONS = [
    (mixed, teacher_dtype, checkpointing, attention)
    for mixed, teacher_dtype in itertools.product(("no", "bf16", "fp16"), ("fp32", "bf16"))
    for checkpointing, attention in ((False, "sdpa"), (True, "eager"))
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=16)


@pytest.mark.parametrize("mixed,teacher_dtype,checkpointing,attention", COMBINATIONS)
def test_switch_combination_trains(tiny, tmp_path, mixed, teacher_dtype, checkpointing, attention):
    # With checkpointing and eager attention: channels-last weights, checkpointed every step, and the reward on the
    # student's own 2-step samples (backpropagated through both).
    channels_last = checkpointing
    overrides = [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={tmp_path}",
        "optim.batch_size=2", "optim.max_train_steps=2", "logging.validation_steps=0", "logging.tracker=none",
        f"precision.gradient_checkpointing={checkpointing}", f"precision.mixed_precision={mixed}",
        f"precision.teacher_dtype={teacher_dtype}", f"precision.attention={attention}",
        f"precision.channels_last={channels_last}", "logging.checkpointing_steps=1",
        *(["reward.target=sample", "reward.grad_steps=2"] if checkpointing else []),
    ]  # fmt: skip
    rglcd("train", "tiny", *overrides)
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 2  # two finite updates
    assert (tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_compiled_training_and_sampling_match_eager(tiny, tmp_path):
    if compile_unavailable():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++ or clang++)")
    summaries, samples = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        overrides = [
            f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}",
            f"logging.output_dir={tmp_path / name}", "optim.batch_size=2", "optim.max_train_steps=2",
            "logging.validation_steps=0", "logging.tracker=none", f"precision.compile={compiled}",
        ]  # fmt: skip
        rglcd("train", "tiny", *overrides)
        summaries[name] = json.loads((tmp_path / name / "train_summary.json").read_text())["parameter_checksums"]
        sample = ["sample", "--model", tmp_path / name / "student", "--prompt", "a red", "--steps", "2"]
        rglcd(*sample, "--out", tmp_path / f"{name}-samples", *(["--compile"] if compiled else []))
        samples[name] = np.asarray(Image.open(tmp_path / f"{name}-samples" / "000-00.png"), dtype=int)
    for part, checksum in summaries["eager"].items():  # the same updates, up to the fused kernels' float rounding
        assert summaries["compiled"][part] == pytest.approx(checksum, rel=1e-7)
    assert np.abs(samples["compiled"] - samples["eager"]).max() <= 1
