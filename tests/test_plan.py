"""`rglcd plan` on a tiny teacher, and the tracer it measures with: exact bytes and FLOPs of known ops."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from rglcd.experiments.demo import tiny_setup
from rglcd.gpus import GPUS
from rglcd.plan import CUDA_AUTOCAST, GIB, StepTracer, cuda_autocast_rules, parse_memory
from rglcd.train import monitor

from .test_cli import run_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=16)


def plan(tiny, *arguments):
    """``rglcd plan tiny`` on the tiny teacher and data, in this process (the README test runs it in a new one)."""
    overrides = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}"]
    return run_main("plan", "tiny", *overrides, *arguments, check=False)


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


def _autocast_ops(device: str) -> dict[str, torch.Tensor]:
    """The ops whose autocast differs between CUDA and the CPU, and some that agree, on a half-precision conv."""
    x = torch.empty(2, 8, 16, 16, device=device, dtype=torch.float16, requires_grad=True)
    weight = torch.empty(8, 8, 3, 3, device=device, requires_grad=True)  # float32, as the trained weights are
    y = F.conv2d(x, weight, padding=1)
    return {
        "conv2d": y, "group_norm": F.group_norm(y, 4), "layer_norm": F.layer_norm(y, (16,)),
        "softmax": F.softmax(y, -1), "log_softmax": F.log_softmax(y, 1), "upsample": F.interpolate(y, scale_factor=2.0),
        "sum": y.sum(), "sum(dim)": y.sum(1), "pow": y**2, "exp": y.exp(), "rsqrt": y.rsqrt(), "norm": y.norm(),
        "cumsum": y.cumsum(0), "mse_loss": F.mse_loss(y, y.float()), "addcmul": torch.addcmul(y, y.float(), y),
        "silu": F.silu(y), "linear": F.linear(y, torch.empty(16, 16, device=device)), "cat": torch.cat([y, y.float()]),
        "conv2d(padding='same')": F.conv2d(x, weight, padding="same"),
        "einsum": torch.einsum("bchw,bchw->bc", y.float(), y.float()),
    }  # fmt: skip


def test_a_gpu_plan_applies_cudas_autocast_rules_on_the_cpu():
    """CUDA's autocast runs normalisations, softmax, upsampling, pow/exp and sums in float32 where the CPU's keeps
    float16: the GPU's plan traces CUDA's dtypes (as CUDA's own kernels give them on fake CUDA tensors, forward only)
    and their bytes; outside the rules the CPU's autocast is back."""
    with FakeTensorMode():
        torch.set_autocast_enabled("cuda", True)  # torch.autocast refuses "cuda" without a GPU; its kernels do not
        torch.set_autocast_dtype("cuda", torch.float16)
        try:
            on_cuda = {name: out.dtype for name, out in _autocast_ops("cuda").items()}
        finally:
            torch.set_autocast_enabled("cuda", False)
        with torch.autocast("cpu", dtype=torch.float16):
            on_cpu = {name: out.dtype for name, out in _autocast_ops("cpu").items()}
        with cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.float16), StepTracer() as tracer:
            outputs = _autocast_ops("cpu")
            ruled = {name: out.dtype for name, out in outputs.items()}
            norm = outputs["group_norm"]
            sum(out.float().sum() for out in outputs.values()).backward()  # the backward pass runs under the rules
        with torch.autocast("cpu", dtype=torch.float16):
            after = {name: out.dtype for name, out in _autocast_ops("cpu").items()}
    assert ruled == on_cuda and after == on_cpu
    differ = {name for name in on_cuda if on_cuda[name] != on_cpu[name]}
    assert differ == {
        "group_norm", "layer_norm", "softmax", "log_softmax", "upsample", "sum", "sum(dim)", "pow", "exp", "rsqrt",
        "norm", "cumsum",
    }  # fmt: skip
    assert all(on_cuda[name] == torch.float32 for name in differ)
    assert norm.untyped_storage().nbytes() == 2 * 8 * 16 * 16 * 4  # float32: twice the CPU autocast's float16
    assert tracer.peak > 0


def test_the_cuda_autocast_table_is_the_installed_torchs():
    """Every op with a CUDA autocast kernel in this torch has its policy in the table, and no other."""
    cuda_ops = {
        name.removeprefix("aten::") for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
    }  # fmt: skip
    listed = [name for names in CUDA_AUTOCAST.values() for name in names]
    assert sorted(listed) == sorted(cuda_ops)


def test_the_gpu_table_is_in_gib_as_torch_reports_it():
    """A card sold as 80 GB holds less than 80 GiB: the budget is the capacity torch reports."""
    assert 79 * GIB < GPUS["H100-80GB"].memory_gib * GIB < 80 * GIB
    assert GPUS["A100-40GB"].memory_gib < 40 and GPUS["RTX-4090"].memory_gib < 24 and GPUS["T4"].memory_gib < 16


def test_the_steps_peak_leaves_validation_and_checkpoints_out(monkeypatch):
    """The CUDA counters, simulated: the steps peak at 5 then 6 GiB, validation at 9 GiB in between (paused)."""
    counters = {"allocated": 0, "reserved": 0, "peak_allocated": 0, "peak_reserved": 0, "emptied": 0}

    def use(allocated, reserved):
        counters.update(allocated=allocated, reserved=reserved)
        counters["peak_allocated"] = max(counters["peak_allocated"], allocated)
        counters["peak_reserved"] = max(counters["peak_reserved"], reserved)

    def reset(device):
        counters.update(peak_allocated=counters["allocated"], peak_reserved=counters["reserved"])

    def empty_cache():
        counters.update(reserved=counters["allocated"], emptied=counters["emptied"] + 1)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: counters["peak_allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: counters["peak_reserved"])
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    use(3, 3)  # the weights, loaded before the loop
    peak = monitor.StepsPeak(torch.device("cuda"))
    use(5, 7), use(3, 7)  # step 1
    with peak.paused():
        use(9, 10), use(3, 10)  # validation
        assert monitor.peak_memory_of_the_steps(torch.device("cuda"))["max_allocated"] == 9  # the counters alone
    assert counters["emptied"] == 1
    use(6, 8), use(3, 8)  # step 2
    with peak.paused():
        use(4, 9)  # a checkpoint
    assert peak.summary() == {"device": "cuda", "max_allocated": 6, "max_reserved": 8}


def test_memory_sizes_parse():
    assert parse_memory("80GiB") == parse_memory("80G") == parse_memory("80") == 80.0
    assert parse_memory("80GB") == 80e9 / 2**30  # decimal, as cards are sold
    assert parse_memory(" 24g ") == 24.0
    for bad in ("lots", "-3GiB", "0"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_memory(bad)


def test_rglcd_plan_prints_memory_flops_and_time(tiny):
    result = plan(tiny, "--gpu", "RTX-4090", "--processes", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for line in ("student UNet", "EMA target UNet", "teacher UNet", "gradients", "optimizer states", "VAE",
                 "reward: colorfulness", "activations and temporaries", "CUDA context", "allocator fragmentation",
                 "NCCL buffers", "total"):  # fmt: skip
        assert f"\n{line}" in text, line
    sizes = {name: float(re.search(rf"\n{name}.*?([\d.]+) MiB", text)[1])
             for name in ("activations and temporaries", "allocator fragmentation")}  # fmt: skip
    assert "allowance: 10% of activations, not traced" in text
    assert sizes["allocator fragmentation"] == pytest.approx(0.1 * sizes["activations and temporaries"], abs=0.1)
    assert "RTX-4090 (23.52 GiB): fits" in text and " MiB" in text
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
    assert "a GPU of 0.0001 GiB: does NOT fit" in result.stdout
    assert "CUDA context" not in result.stdout and "fragmentation" not in result.stdout
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


def test_rglcd_plan_counts_the_fake_score_network_and_its_update(tiny):
    """dmd/gan: the fake network (whole or LoRA), its AdamW states and its traced update are lines of the plan, and
    the switch search knows dmd.fake_lora_rank."""
    from rglcd.config import load_config
    from rglcd.plan import candidate_switches

    states = {}
    for rank in (0, 4):
        result = plan(tiny, "dmd.weight=1", "gan.weight=0.1", f"dmd.fake_lora_rank={rank}", "--device", "cpu")
        assert result.returncode == 0, result.stderr[-2000:]
        kind = f"LoRA rank {rank} on a frozen copy" if rank else "whole copy"
        assert f"\nfake score network ({kind}) + head" in result.stdout
        assert "fake score network update with the discriminator" in result.stdout
        assert "the student's sample, real and fake scores" in result.stdout
        states[rank] = float(re.search(r"\nfake score network: AdamW states.*?([\d.]+) MiB", result.stdout)[1])
    assert states[4] < states[0]
    overrides = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", "dmd.weight=1"]
    labels = [switch.label for switch in candidate_switches(load_config("tiny", overrides), 2, False)]
    assert "dmd.fake_lora_rank=64 (a LoRA fake score network)" in labels
    assert not any(label.startswith("FSDP") for label in labels)  # the fake network is not sharded


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--gpu-memory", "lots"], "--gpu-memory: 'lots' is not a size like 80GiB"),
        (["--fsdp"], "--fsdp: needs --processes >= 2"),
        (["--processes", "0"], "argument --processes: must be at least 1, got 0"),
        (["--utilization", "2"], "--utilization"),
        (["optim.batch_size=0"], "optim.batch_size: must be in [1, 65536]"),
    ],
)
def test_rglcd_plan_refuses_bad_input_in_one_line(tiny, arguments, message):
    result = plan(tiny, *arguments)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_plan_traces_the_forward_the_loop_runs(tiny, tmp_path, monkeypatch):
    """`rglcd plan` and `rglcd train` call one training forward (rglcd.train.forward), which calls the step: a spy
    on the step inside it sees the same arguments from both (a plan with its own step would not be seen)."""
    from rglcd import plan as planning
    from rglcd.config import load_config
    from rglcd.train import forward, loop, train

    assert loop.training_forward is planning.training_forward is forward.training_forward
    calls = {}
    step = forward.rglcd_step

    def spy(**kwargs):
        calls.setdefault(caller, []).append(sorted(key for key, value in kwargs.items() if value is not None))
        return step(**kwargs)

    monkeypatch.setattr(forward, "rglcd_step", spy)
    overrides = [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={tmp_path / 'run'}",
        "optim.max_train_steps=1", "optim.batch_size=2", "logging.validation_steps=0", "logging.tracker=none",
    ]  # fmt: skip
    config = load_config("tiny", overrides)
    caller = "plan"
    planning.make_plan(config, device="cpu")
    caller = "train"
    train(config)
    assert len(calls["plan"]) == len(calls["train"]) == 1
    assert calls["plan"] == calls["train"] and "reward" in calls["train"][0]


def flops_by_hand(config) -> int:
    """FLOPs of one training step of ``config`` counted here, layer by layer, on real tensors: the step
    (rglcd.train.forward.training_forward) runs once on the CPU, every convolution and linear layer it calls adds
    2 · (its output's size) · (the multiply-adds per output value: in_features, or C_in/groups · k_h · k_w), and
    every attention 2 · 2·B·h·L_q·L_k·d (Q·Kᵀ and P·V). The backward pass adds the forward's FLOPs once for each
    gradient it computes (input and weight, where they require grad); an attention's adds 5 of its 2·B·h·L_q·L_k·d
    products (the scores recomputed, then dV, dP, dQ and dK: FlashAttention's backward)."""
    import torch.nn as nn

    from rglcd.models import load_teacher, text_conditioning
    from rglcd.train.build import (
        build_distillation,
        build_expert,
        build_networks,
        build_student_reward,
        float_conditions,
    )
    from rglcd.train.forward import StepParts, training_forward

    records = []  # (forward FLOPs, how many times the backward pass repeats them)

    def layer(module, inputs, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            per_value = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.in_features
            gradients = inputs[0].requires_grad + module.weight.requires_grad if output.requires_grad else 0
            records.append((2 * output.numel() * per_value, gradients))

    attention = F.scaled_dot_product_attention

    def counted_attention(query, key, value, *args, **kwargs):
        out = attention(query, key, value, *args, **kwargs)
        batch, heads, queries, depth = query.shape
        product = 2 * batch * heads * queries * key.shape[-2] * depth
        records.append((2 * product, 2.5 if out.requires_grad else 0))  # backward: 5 products = 2.5 forwards
        return out

    teacher = load_teacher(config.model.teacher)
    networks = build_networks(config, teacher, torch.device("cpu"))
    distillation = build_distillation(config, teacher, networks.student)
    reward = build_student_reward(config, build_expert(config), None, teacher.vae, distillation)
    size = config.optim.batch_size
    embeds, added = text_conditioning(teacher, [""] * size, config.data.resolution)  # before the loop: not counted
    parts = StepParts(
        teacher, networks, distillation, reward, (embeds.float(), float_conditions(added)), None,
        config.data.resolution, config.distill.lcd_weight, None,
    )  # fmt: skip
    side = config.data.resolution
    batch = {"pixel_values": torch.rand(size, 3, side, side) * 2 - 1, "captions": ["a red picture"] * size}
    hook = torch.nn.modules.module.register_module_forward_hook(layer)
    F.scaled_dot_product_attention = counted_attention
    try:
        forward = training_forward(parts, batch, torch.Generator().manual_seed(0), 0)
    finally:
        hook.remove()
        F.scaled_dot_product_attention = attention
    forward.output.loss.backward()  # (runs, so that a layer whose output required grad without a backward shows)
    total = sum(flops * (1 + gradients) for flops, gradients in records)
    assert total == int(total)
    return int(total)


def test_the_plans_flops_and_time_are_the_layers_by_hand(tiny):
    """The plan's FLOPs per optimizer step (traced on fake tensors) equal the step's layers counted by hand on real
    ones, times the accumulation steps; the time is FLOPs / (the GPU's peak · utilisation), per step and per run."""
    from rglcd.config import load_config
    from rglcd.plan import PAPER_ITERATIONS, Plan, format_plan, make_plan, seconds_per_step

    overrides = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", "optim.batch_size=2"]
    config = load_config("tiny", overrides)
    by_hand = flops_by_hand(config)
    assert by_hand > 10**8
    assert make_plan(config, device="cpu").flops == by_hand
    accumulated = load_config("tiny", [*overrides, "optim.gradient_accumulation_steps=3"])
    assert make_plan(accumulated, device="cpu").flops == 3 * by_hand  # one optimizer step: 3 micro-batches
    gpu = GPUS["RTX-4090"]  # 165 TFLOPS
    assert seconds_per_step(Plan(config, 1, False, "cuda", flops=by_hand), gpu, 0.4) == by_hand / (0.4 * 165e12)

    # 2.64 PFLOP a step at 40 % of 165 TFLOPS (66 TFLOP/s): 40 s a step, 10,000 steps 400,000 s = 111.1 h, the
    # tiny preset's 100 steps 4,000 s = 1.1 h.
    assert PAPER_ITERATIONS == 10_000 and config.optim.max_train_steps == 100
    text = format_plan(Plan(config, 1, False, "cuda", flops=2.64e15), "tiny", "RTX-4090", gpu, 0.4)
    assert "\nFLOPs per optimizer step and process: 2,640.00 TFLOP (torch's FLOP formulas on the step)\n" in text
    assert text.endswith(
        "\ntime on RTX-4090 at 40% of its 165 TFLOPS: 40.00 s per step; the paper's 10,000 iterations: 111.1 h; "
        "this config's 100: 1.1 h"
    )
