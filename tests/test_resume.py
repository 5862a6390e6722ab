"""Exact resume: a run stopped at a checkpoint and resumed with ``--resume latest`` ends where the uninterrupted run
ends, bit for bit: its last checkpoint (weights, EMA target, AdamW moments, schedule, RNG and data positions, the
fake score network, the latent proxy and their optimizers) and its exports, for every kind of run.

One uninterrupted reference run per kind, shared by the tests that read it (each kind's own checks, the gradient
accumulation's counts). The interruption is, for one kind, a real ``kill -9`` of an ``rglcd train`` process inside a
step after its checkpoint-2 (on an event: the process says it is in the step); for the others, what such a kill
leaves (config.yaml and checkpoint-2, copied from the reference run into its folder), resumed in this process.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rglcd.config import load_config
from rglcd.data import write_cache
from rglcd.experiments.demo import tiny_setup
from rglcd.rewards.latent import LatentClip
from rglcd.tiny import save_tiny_pipeline
from rglcd.train import TrainingError, checkpoints, loop, train

from .test_cli import run_main
from .test_latent_reward import TINY_LRM
from .test_run_folder import snapshot, stall

STEPS, EVERY = 4, 2  # the runs' steps and checkpoints; the interruption is after checkpoint-2
KINDS = {  # kind: its settings
    "plain": {},
    # The reward on the student's own samples every 3rd step: it applies at steps 0 and 3, the resume is between.
    "sample-every-3": {"reward.target": "sample", "reward.sample_steps": 4, "reward.grad_steps": 2, "reward.every": 3},
    # DMD and GAN terms: the fake score network, its head and their AdamW come back from the checkpoint.
    "dmd-gan": {"dmd.weight": 1.0, "gan.weight": 0.1, "dmd.fake_updates": 2, "dmd.student_steps": 2},
    "lora": {"lora.rank": 4},
    "lora-sample": {"lora.rank": 4, "reward.target": "sample"},  # the LoRA student has no guidance embedding
    "sdxl": {"model.teacher": "{SDXL}"},
    "cached": {"data.source": "{CACHE}"},  # `rglcd cache` latents and embeddings
    "latent-proxy": {  # Alg. 4: the proxy RM fitted online, its AdamW
        "reward.mode": "latent", "reward.latent.model": "{LRM}", "reward.latent.batch_size": 2,
        "reward.latent.learning_rate": 1e-3, "reward.latent.unlocked_text_groups": 1,
    },
    "accumulation": {"optim.gradient_accumulation_steps": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny SD teacher and data, a tiny SDXL teacher, a cache of the data and an (untrained) latent proxy."""
    root = tmp_path_factory.mktemp("assets")
    tiny = tiny_setup(root / "tiny", samples=16)
    torch.manual_seed(0)
    LatentClip(TINY_LRM).save_pretrained(root / "lrm")
    return {
        "TEACHER": tiny / "teacher", "DATA": tiny / "data", "LRM": root / "lrm",
        "SDXL": save_tiny_pipeline(root / "sdxl", sdxl=True),
        "CACHE": write_cache(tiny / "teacher", tiny / "data", root / "cache", resolution=32, progress=False),
    }  # fmt: skip


def settings(assets, kind, out):
    fields = {
        "model.teacher": "{TEACHER}", "data.source": "{DATA}", "logging.output_dir": out, "optim.batch_size": 2,
        "optim.max_train_steps": STEPS, "logging.checkpointing_steps": EVERY, "logging.validation_steps": 0,
        "logging.tracker": "none", "logging.log_every": 1, **KINDS[kind],
    }  # fmt: skip
    return [f"{key}={str(value).format(**assets)}" for key, value in fields.items()]


class Record:
    """What a run did, step by step: each training forward's step index, and at each EMA update (once per optimizer
    step) the global step, the learning rate and AdamW's step count; the EMA updates of the target."""

    def __init__(self, monkeypatch):
        self.forwards, self.updates, self.ema_updates = [], [], 0
        forward, ema_update, update_ema = loop.training_forward, loop.ema_update, loop.update_ema

        def recorded_forward(parts, batch, generator, step, *args):
            self.forwards.append(step)
            return forward(parts, batch, generator, step, *args)

        def recorded_ema_update(run, *args):
            adam_steps = {float(state["step"]) for state in run.optimizer.optimizer.state.values()}
            self.updates.append((run.global_step, run.lr_scheduler.get_last_lr()[0], adam_steps))
            return ema_update(run, *args)

        def counted_update_ema(*args):
            self.ema_updates += 1
            return update_ema(*args)

        monkeypatch.setattr(loop, "training_forward", recorded_forward)
        monkeypatch.setattr(loop, "ema_update", recorded_ema_update)
        monkeypatch.setattr(loop, "update_ema", counted_update_ema)


@pytest.fixture(scope="module")
def references(assets, tmp_path_factory):
    """kind → (the uninterrupted run's folder, its Record), each run once, when first asked for."""
    runs = {}

    def reference(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(kind) / "straight"
            with pytest.MonkeyPatch.context() as monkeypatch:
                record = Record(monkeypatch)
                train(load_config("tiny", settings(assets, kind, out)))
            runs[kind] = out, record
        return runs[kind]

    return reference


def digests(folder: Path, other_run: bool) -> dict[str, str]:
    """Every file's SHA-256 by relative path; trainer_state.json as its JSON without the run folder's path (and the
    run's id, for a comparison with ``other_run``)."""
    found = {relative: digest for relative, digest in snapshot(folder).items() if digest != "folder"}
    for relative in [relative for relative in found if relative.endswith("trainer_state.json")]:
        state = json.loads((folder / relative).read_text())
        state["settings"].pop("logging.output_dir")
        if other_run:
            state.pop("run_id")
        found[relative] = state
    return found


def exported_weights(run: Path) -> dict[str, str]:
    """The exports' weight files (student, EMA target, LoRA adapters, the latent proxy), hashed."""
    return {
        str(path.relative_to(run)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run.glob("*/**/*.safetensors"))
        if "checkpoints" not in path.parts
    }


def held(kind: str) -> tuple[set[str], set[str]]:
    """The files each kind's last checkpoint holds at least, and its exported weights."""
    if kind.startswith("lora"):  # the EMA target is an adapter, saved with the student's
        files, exported = {"model.safetensors"}, {"lora", "target_lora"}
        exported = {f"{name}/pytorch_lora_weights.safetensors" for name in exported}
    else:
        files = {"model.safetensors", "target.safetensors"}
        exported = {f"{name}/diffusion_pytorch_model.safetensors" for name in ("student/unet", "target_unet")}
    files |= {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "generator-0.safetensors", "trainer_state.json"}
    if kind == "dmd-gan":
        files |= {"fake_unet.safetensors", "fake_head.safetensors", "fake_optimizer.pt"}
    if kind == "latent-proxy":
        files |= {"latent_rm.safetensors", "latent_rm_optimizer.pt"}
        exported |= {"latent_rm/model.safetensors"}
    return files, exported


def interrupt_like_a_kill(straight: Path, out: Path) -> None:
    """What a kill -9 after checkpoint-2 leaves in ``out``: config.yaml and checkpoint-2 (copied)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", out / "config.yaml")
    shutil.copytree(straight / "checkpoints" / f"checkpoint-{EVERY}", out / "checkpoints" / f"checkpoint-{EVERY}")


@pytest.mark.parametrize(("kind", "how"), [("plain", "kill -9"), *((kind, "copy") for kind in list(KINDS)[1:])])
def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(assets, references, tmp_path, kind, how):
    """The resumed run repeats the reference's last steps (forwards, learning rates, AdamW counts) and ends with
    its final checkpoint and exports byte for byte."""
    straight, reference = references(kind)
    out = tmp_path / "resumed"
    if how == "kill -9":  # a real `rglcd train` process, killed inside step 3 (after checkpoint-2)
        stall(tmp_path / "in-step", EVERY + 1, *settings(assets, kind, out))
        assert (out / "config.yaml").is_file() and [p.name for p in checkpoints(out)] == [f"checkpoint-{EVERY}"]
        assert not (out / "student").exists()
    else:
        interrupt_like_a_kill(straight, out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        resumed = Record(monkeypatch)
        result = run_main("train", "tiny", *settings(assets, kind, out), "--resume", "latest")
    if how == "copy":  # the run folder is the one setting that differs
        assert f"resumed with changed settings: logging.output_dir {straight} → {out}\n" in result.stdout
    accumulation = load_config("tiny", settings(assets, kind, out)).optim.gradient_accumulation_steps
    assert resumed.forwards == reference.forwards[EVERY * accumulation :]
    assert resumed.updates == reference.updates[EVERY:]
    final = f"checkpoints/checkpoint-{STEPS}"
    files, exported = held(kind)
    assert files <= {path.name for path in (out / final).iterdir()}
    assert digests(out / final, how == "kill -9") == digests(straight / final, how == "kill -9")
    assert exported <= exported_weights(out).keys() and exported_weights(out) == exported_weights(straight)
    summaries = [json.loads((run / "train_summary.json").read_text()) for run in (out, straight)]
    assert summaries[0]["global_step"] == STEPS
    assert summaries[0]["parameter_checksums"] == summaries[1]["parameter_checksums"]
    if kind.startswith("lora"):  # a fixed setting changed: refused before any model loads
        with pytest.raises(TrainingError, match=re.escape("lora.rank (4 → 8) cannot change")):
            train(load_config("tiny", [*settings(assets, kind, out), "lora.rank=8"]), resume="latest")


def test_gradient_accumulation_counts_optimizer_steps(assets, references):
    """optim.gradient_accumulation_steps=2: two forwards (micro-batches) per step, each with its optimizer step's
    index; the global step, the checkpoints, the data position, AdamW, the warm-up schedule and the EMA target's
    update (once per optimizer step, after it) count optimizer steps, not micro-batches."""
    straight, record = references("accumulation")
    assert record.forwards == [0, 0, 1, 1, 2, 2, 3, 3] and record.ema_updates == STEPS
    optim = load_config("tiny", settings(assets, "accumulation", straight)).optim
    assert (optim.lr_scheduler, optim.lr_warmup_steps) == ("constant_with_warmup", 10)
    rising = [optim.learning_rate * (k + 1) / 10 for k in range(STEPS)]  # the warm-up's, per optimizer step
    assert record.updates == [(k, pytest.approx(lr), {k + 1.0}) for k, lr in enumerate(rising)]
    assert [p.name for p in checkpoints(straight)] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint, step in zip(checkpoints(straight), (2, 4), strict=True):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["data"][0]["stats"]["seen"] == step * 2 * 2  # 2 × batch 2
        assert torch.load(checkpoint / "scheduler.bin", weights_only=True)["last_epoch"] == step
    assert json.loads((straight / "train_summary.json").read_text())["global_step"] == STEPS


def test_latent_mode_fits_the_proxy_and_checkpoints_it(assets, references):
    """Alg. 4's run: the proxy's unlocked groups move (its text projection; never the token embedding), and the
    checkpoint holds the EMA target, the proxy and its AdamW in weights-only files (nothing pickled)."""
    straight, _ = references("latent-proxy")
    proxy, initial = (load_file(folder / "model.safetensors") for folder in (straight / "latent_rm", assets["LRM"]))
    moved = [key for key in proxy if not torch.equal(proxy[key], initial[key])]
    assert "clip.text_projection" in moved and all(not key.startswith("clip.token_embedding") for key in moved)
    checkpoint = straight / "checkpoints" / f"checkpoint-{STEPS}"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"target.safetensors", "latent_rm.safetensors", "latent_rm_optimizer.pt"} <= names
    assert not list(checkpoint.glob("custom_checkpoint_*"))


def test_accumulated_gradients_are_the_mean_of_the_micro_batches(assets, tmp_path, monkeypatch):
    """Under accumulation 2, after each micro-batch's backward the student's gradient is the sum of the
    micro-batches' loss gradients so far, each divided by 2: nothing zeroed between them, and the optimizer steps
    on their mean (not their sum)."""
    from accelerate import Accelerator

    backward, forward = Accelerator.backward, loop.training_forward
    state = {"student": None, "running": None}  # the running sum of the micro-batches' gradients / 2
    checked = []

    def recorded_forward(parts, *args):
        state["student"] = parts.networks.student
        return forward(parts, *args)

    def checked_backward(self, loss, **kwargs):
        params = [p for p in state["student"].parameters() if p.requires_grad]
        own = torch.autograd.grad(loss, params, retain_graph=True)
        if state["running"] is None:
            state["running"] = [torch.zeros_like(p) for p in params]
        state["running"] = [r + g / 2 for r, g in zip(state["running"], own, strict=True)]
        backward(self, loss, **kwargs)
        for param, expected in zip(params, state["running"], strict=True):
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
        checked.append("synced" if self.sync_gradients else "accumulating")
        if self.sync_gradients:  # the optimizer steps on these gradients, then zeroes them
            state["running"] = None

    monkeypatch.setattr(loop, "training_forward", recorded_forward)
    monkeypatch.setattr(Accelerator, "backward", checked_backward)
    train(load_config("tiny", [*settings(assets, "accumulation", tmp_path / "run"), "optim.max_train_steps=2"]))
    assert checked == ["accumulating", "synced"] * 2


def test_a_non_finite_micro_batch_skips_its_whole_optimizer_step(assets, tmp_path, monkeypatch):
    """Under accumulation 2, a NaN loss in the first micro-batch of optimizer step 1 skips that step (counted, no
    AdamW or EMA update) instead of stepping on the other micro-batch alone; the next step is a normal one."""
    record = Record(monkeypatch)
    forward, skip = loop.training_forward, loop.skip_non_finite_step  # training_forward: Record's
    micro_batches, skipped = [], []

    def poisoned_forward(*args):
        result = forward(*args)
        micro_batches.append(result)
        if len(micro_batches) == 3:  # the first micro-batch of optimizer step 1
            result.output.loss = result.output.loss * float("nan")
        return result

    monkeypatch.setattr(loop, "training_forward", poisoned_forward)
    monkeypatch.setattr(loop, "skip_non_finite_step", lambda run: (skipped.append(run.global_step), skip(run)))
    train(load_config("tiny", [*settings(assets, "accumulation", tmp_path / "run"), "optim.max_train_steps=2"]))
    assert record.forwards == [0, 0, 1, 1, 1, 1] and skipped == [1]
    assert [(step, adam_steps) for step, _, adam_steps in record.updates] == [(0, {1.0}), (1, {2.0})]
    assert record.ema_updates == 2


def test_the_fake_score_network_updates_dmd_fake_updates_times_per_student_update(assets, tmp_path, monkeypatch):
    """``dmd.fake_updates`` counts per optimizer step of the student, not per micro-batch: 2 student updates of 2
    micro-batches each with 3 fake updates are 6 fake AdamW steps."""
    from rglcd.train.fake_score import FakeScore

    fake_steps, step = [], FakeScore.step
    monkeypatch.setattr(FakeScore, "step", lambda self, *args: (fake_steps.append(1), step(self, *args))[1])
    overrides = ["optim.max_train_steps=2", "dmd.weight=1.0", "dmd.fake_updates=3"]
    train(load_config("tiny", [*settings(assets, "accumulation", tmp_path / "run"), *overrides]))
    assert len(fake_steps) == 6
