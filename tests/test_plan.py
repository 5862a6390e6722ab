"""`rglcd plan` on a tiny teacher, and the tracer it measures with: exact bytes and FLOPs of known ops."""

import itertools
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from rglcd.experiments.demo import tiny_setup
from rglcd.plan import StepTracer, parse_memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=16)


def plan(tiny, *arguments):
    overrides = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}"]
    return subprocess.run(
        [sys.executable, "-m", "rglcd", "plan", "tiny", *overrides, *arguments], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_the_tracer_follows_allocations_and_releases_exactly():
    with FakeTensorMode(), StepTracer() as tracer:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float16)  # 1,000
        a.mul_(2)  # in place: nothing new
        view = a[:10]  # a view: nothing new
        tracer.mark("made")
        c = a + 1  # 4,000
        del c, view
        tracer.mark("added")
        del a
        assert tracer.live == 1000
        del b
    assert tracer.peak == 9000 and tracer.live == 0
    assert tracer.phases == {"made": 5000, "added": 9000}


def test_the_tracer_counts_flops_with_torchs_formulas_and_cpu_flash_attention():
    with FakeTensorMode(), StepTracer() as tracer:
        torch.empty(8, 16) @ torch.empty(16, 4)
    assert tracer.flops == 2 * 8 * 16 * 4
    with FakeTensorMode(), StepTracer() as tracer:
        query = torch.empty(2, 4, 64, 32)  # [B, heads, L, D]
        F.scaled_dot_product_attention(query, query, query)
    assert tracer.flops == 2 * (2 * 2 * 4 * 64 * 64 * 32)  # Q·Kᵀ and P·V


def test_memory_sizes_parse():
    assert parse_memory("80GiB") == parse_memory("80GB") == parse_memory("80") == 80.0
    assert parse_memory(" 24g ") == 24.0
    for bad in ("lots", "-3GiB", "0"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_memory(bad)


def test_rglcd_plan_prints_memory_flops_and_time(tiny):
    result = plan(tiny, "--gpu", "RTX-4090")
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for line in ("student UNet", "EMA target UNet", "teacher UNet", "gradients", "optimizer states", "VAE",
                 "reward: colorfulness", "activations and temporaries", "CUDA context", "total"):  # fmt: skip
        assert f"\n{line}" in text, line
    assert "RTX-4090 (24 GiB): fits" in text and " MiB" in text
    assert "FLOPs per optimizer step" in text and "the paper's 10,000 iterations" in text
    assert "switches that make it fit" not in text


def test_rglcd_plan_counts_the_sampler_reward(tiny):
    """reward.target=sample traces the student's own sampling too: its backward through 2 steps costs more."""
    totals = []
    for target in (
        ["reward.target=prediction"],
        ["reward.target=sample", "reward.sample_steps=4", "reward.grad_steps=2"],
    ):
        result = plan(tiny, *target, "--gpu", "RTX-4090")
        assert result.returncode == 0, result.stderr[-2000:]
        totals.append(float(re.search(r"\ntotal\s+([\d.]+) MiB", result.stdout)[1]))
    assert "forward: student, teacher, target, 4-step sample, decoder and reward" in result.stdout
    assert totals[1] > totals[0]


def test_rglcd_plan_lists_the_switches_that_make_a_run_fit(tiny):
    result = plan(tiny, "--gpu-memory", "0.0001GiB", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a GPU of 0.0001 GiB: does NOT fit" in result.stdout and "CUDA context" not in result.stdout
    switches = result.stdout.split("switches that make it fit")[1].splitlines()[1:]
    labels = [line.split()[1] for line in switches if line.startswith("  + ")]
    # In order; LoRA is skipped: rank-64 adapters are larger than this tiny UNet's layers.
    assert labels == [
        "precision.teacher_dtype=bf16", "precision.gradient_checkpointing=true", "reward.decode_batch_size=1",
        "optim.use_8bit_adam=true", "optim.batch_size=4", "optim.batch_size=2", "optim.batch_size=1",
    ]  # fmt: skip
    totals = [float(re.search(r"([\d.]+) MiB", line)[1]) for line in switches if line.startswith("  + ")]
    assert all(after < before for before, after in itertools.pairwise(totals))
    assert "still too large" in result.stdout


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--gpu-memory", "lots"], "--gpu-memory: 'lots' is not a size like 80GiB"),
        (["--fsdp"], "--fsdp: needs --processes >= 2"),
        (["--processes", "0"], "argument --processes: must be at least 1, got 0"),
        (["--utilization", "2"], "--utilization"),
        (["optim.batch_size=0"], "optim.batch_size: must be > 0"),
    ],
)
def test_rglcd_plan_refuses_bad_input_in_one_line(tiny, arguments, message):
    result = plan(tiny, *arguments)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
