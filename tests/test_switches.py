"""Memory and speed switches together: every precision pair with checkpointing/attention variants trains on a CPU.

Each run is its own process (`rglcd train`): accelerate fixes the mixed precision once per process.
"""

import itertools
import json
import subprocess
import sys

import pytest

from rglcd.experiments.demo import tiny_setup

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
    overrides = [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={tmp_path}",
        "optim.batch_size=2", "optim.max_train_steps=2", "logging.validation_steps=0", "logging.tracker=none",
        f"precision.gradient_checkpointing={checkpointing}", f"precision.mixed_precision={mixed}",
        f"precision.teacher_dtype={teacher_dtype}", f"precision.attention={attention}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "rglcd", "train", "tiny", *overrides], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 2  # two finite updates
    assert (tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
