"""Several processes on the CPU (gloo), launched as users launch them: torchrun (accelerate launch is the same), and
accelerate launch with the documented FSDP config."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from rglcd.config import ConfigError, load_config
from rglcd.experiments.demo import tiny_setup
from rglcd.rewards.latent import WORLD_LATENT_CLIP, LatentClip
from rglcd.train import check_engine

from .test_cli import run_main

HERE = Path(__file__).parent
FSDP_CONFIG = HERE.parent / "docs" / "accelerate" / "fsdp.yaml"
STUDENT_WEIGHTS = "student/unet/diffusion_pytorch_model.safetensors"
TARGET_WEIGHTS = "target_unet/diffusion_pytorch_model.safetensors"


def torchrun(processes: int, *args, cwd=None):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *args], cwd=cwd)  # fmt: skip


def launch(command: list[str], cwd=None, check=True, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    ranks_said = "\n".join(line for line in result.stderr.splitlines() if line.startswith("[rank"))
    assert result.returncode == 0 or not check, ranks_said[-6000:] or result.stderr[-4000:]
    return result


def test_two_processes_average_to_the_whole_batch(epsilon_teacher_dir, tmp_path):
    """DDP's gradient average over two half-batches is the whole batch's gradient: two ranks agree exactly with
    each other and, within float rounding, with one process that took the whole batch (3 SGD steps)."""
    for processes in (1, 2):
        torchrun(processes, str(HERE / "distributed_step.py"), str(epsilon_teacher_dir), str(tmp_path))
    single = load_file(tmp_path / "rank0-of-1.safetensors")
    rank0, rank1 = (load_file(tmp_path / f"rank{r}-of-2.safetensors") for r in (0, 1))
    assert rank0.keys() == single.keys() and any(key.startswith("grad.") for key in single)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    largest_gradient = max(single[key].abs().max() for key in single if key.startswith("grad."))
    for key in single:
        tolerance = 1e-5 * largest_gradient if key.startswith("grad.") else 1e-6
        torch.testing.assert_close(rank0[key], single[key], atol=tolerance, rtol=0, msg=key)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=64)


def train_overrides(tiny, out, steps) -> list[str]:
    return [
        f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
        "optim.batch_size=4", f"optim.max_train_steps={steps}", "logging.checkpointing_steps=2",
        "logging.validation_steps=2", "logging.log_every=1",
    ]  # fmt: skip


def train_two_processes(tiny, out, steps, *extra):
    return torchrun(2, "-m", "rglcd", "train", "tiny", *train_overrides(tiny, out, steps), *extra)


# Ports without a race: torchrun's --standalone rendezvous (c10d on localhost:0) binds its TCPStore to port 0 and the
# workers join that store (TORCHELASTIC_USE_AGENT_STORE), so no port number is picked before it is bound. accelerate
# launch has no flag for it, but hands its arguments to torchrun's parser, which reads PET_STANDALONE=1 as
# --standalone and then ignores the config's static rendezvous (rdzv_backend: static, port 29500). A port probed free
# and passed as --main_process_port (the earlier free_port()) could be taken by another test process in between.
STANDALONE_RENDEZVOUS = {"PET_STANDALONE": "1"}


def train_fsdp(tiny, out, steps, *extra):
    """Two processes under accelerate launch with docs/accelerate/fsdp.yaml (see fsdp_on_cpu.py)."""
    return launch([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
        str(HERE / "fsdp_on_cpu.py"), "train", "tiny", *train_overrides(tiny, out, steps), *extra,
    ], env=STANDALONE_RENDEZVOUS)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    """Four steps of two DDP processes."""
    out = tmp_path_factory.mktemp("ddp")
    train_two_processes(tiny, out, 4)
    return out


def same_weights(run_a: Path, run_b: Path, weights: str) -> bool:
    a, b = load_file(run_a / weights), load_file(run_b / weights)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_two_process_training_stays_in_step_and_resumes_exactly(tiny, ddp_run, tmp_path):
    straight = ddp_run
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 4 and summary["ranks_agree"]
    checkpoint = straight / "checkpoints" / "checkpoint-4"
    assert {"generator-0.safetensors", "generator-1.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= {
        path.name for path in checkpoint.iterdir()
    }
    data_states = json.loads((checkpoint / "trainer_state.json").read_text())["data"]
    assert [(state["order"]["rank"], state["order"]["world_size"]) for state in data_states] == [(0, 2), (1, 2)]
    # The main process alone writes validation grids and logs.
    assert sorted(path.name for path in (straight / "validation").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    writers = {path.name.split(".")[-2] for path in (straight / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files are named ...<host>.<pid>.<n>: one process wrote them all

    resumed = tmp_path / "resumed"
    train_two_processes(tiny, resumed, 2)
    train_two_processes(tiny, resumed, 4, "--resume", "latest")
    assert same_weights(straight, resumed, STUDENT_WEIGHTS)


def test_fsdp_shards_the_student_matches_ddp_and_resumes_exactly(tiny, ddp_run, tmp_path):
    """FSDP2 (the documented config) over 2 processes: sharded checkpoints, validation on every rank without a
    hang, a whole export equal to DDP's within float rounding, and an exact resume."""
    straight = tmp_path / "straight"
    train_fsdp(tiny, straight, 4)
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 4 and summary["ranks_agree"]
    assert (straight / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()  # per-rank shards
    assert sorted(path.name for path in (straight / "validation").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    # Same global batch, data and noise as DDP: only the gradient reduction's rounding differs.
    for weights in (STUDENT_WEIGHTS, TARGET_WEIGHTS):
        fsdp, ddp = load_file(straight / weights), load_file(ddp_run / weights)
        assert fsdp.keys() == ddp.keys()
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-6, rtol=0, msg=key)
    ddp_checksums = json.loads((ddp_run / "train_summary.json").read_text())["parameter_checksums"]
    for name, checksum in ddp_checksums.items():  # gathered from the shards, comparable to DDP's
        assert summary["parameter_checksums"][name] == pytest.approx(checksum, rel=1e-9)

    resumed = tmp_path / "resumed"
    train_fsdp(tiny, resumed, 2)
    train_fsdp(tiny, resumed, 4, "--resume", "latest")
    assert same_weights(straight, resumed, STUDENT_WEIGHTS) and same_weights(straight, resumed, TARGET_WEIGHTS)
    # Sharded checkpoints resume only under FSDP.
    as_ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rglcd",
              "train", "tiny", *train_overrides(tiny, resumed, 6), "--resume", "latest"]  # fmt: skip
    result = launch(as_ddp, check=False)
    assert result.returncode != 0 and "was saved with FSDP and this run uses DDP" in result.stderr


@pytest.mark.parametrize(
    ("engine", "fsdp2", "setting", "fix"),
    [
        (DistributedType.DEEPSPEED, False, None, "docs/accelerate/fsdp.yaml"),
        (DistributedType.FSDP, False, None, "fsdp_version: 2"),
        (DistributedType.FSDP, True, ("lora", "rank", 4), "--multi_gpu (DDP)"),
        (DistributedType.FSDP, True, ("optim", "use_8bit_adam", True), "set optim.use_8bit_adam=false"),
    ],
)
def test_unsupported_engines_are_refused_with_the_fix(tiny, engine, fsdp2, setting, fix):
    paths = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}"]
    config = load_config("tiny", paths)
    if setting is not None:  # set after validation: bitsandbytes need not be installed for the check
        section, field, value = setting
        setattr(getattr(config, section), field, value)
    with pytest.raises(ConfigError, match=re.escape(fix)):
        check_engine(SimpleNamespace(distributed_type=engine, is_fsdp2=fsdp2), config)
    supported = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    assert check_engine(supported, load_config("tiny", paths)) is True


def test_two_process_latent_proxy_stays_identical_on_both_ranks(tiny, tmp_path):
    lrm = tmp_path / "lrm"
    torch.manual_seed(0)  # an untrained proxy of the tiny teacher's 8×8 latents: the fit is what is tested
    LatentClip(replace(WORLD_LATENT_CLIP, latent_size=8, latent_channels=4)).save_pretrained(lrm, {"note": "test"})
    out = tmp_path / "run"
    latent = ["reward.mode=latent", f"reward.latent.model={lrm}", "reward.latent.batch_size=2",
              "reward.latent.learning_rate=1e-3", "reward.latent.unlocked_text_groups=1"]  # fmt: skip
    train_two_processes(tiny, out, 2, *latent)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["ranks_agree"] and set(summary["parameter_checksums"]) == {"student", "target", "latent_rm"}
    fitted, pretrained = load_file(out / "latent_rm" / "model.safetensors"), load_file(lrm / "model.safetensors")
    assert not torch.equal(fitted["clip.text_projection"], pretrained["clip.text_projection"])  # it was fitted


def test_resuming_with_another_process_count_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "run"
    train_two_processes(tiny, out, 2)
    overrides = [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}", f"logging.output_dir={out}",
                 "optim.batch_size=4", "optim.max_train_steps=4", "logging.validation_steps=0"]  # fmt: skip
    result = run_main("train", "tiny", *overrides, "--resume", "latest", check=False)
    assert result.returncode == 2 and "was saved by 2 processes and this run has 1" in result.stderr


def test_fsdp_asked_for_on_a_cpu_says_the_run_is_data_parallel(tiny, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --config_file fsdp.yaml sets
    config = load_config("tiny", [f"model.teacher={tiny / 'teacher'}", f"data.source={tiny / 'data'}"])
    cpu_group = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_main_process=True)
    assert check_engine(cpu_group, config) is False
    assert "accelerate runs this as MULTI_CPU (it shards only over several GPU processes)" in caplog.text
