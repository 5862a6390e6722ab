"""`rglcd train`: smoke run, atomic checkpoints, NaN handling, bad data (exact resume: tests/test_resume.py)."""

import json
import pickle
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors.torch import load_file

from rglcd.config import load_config
from rglcd.data import DataError
from rglcd.experiments.demo import colour_samples, tiny_setup
from rglcd.grid import GAP, ROW_LABEL_WIDTH, upscale_factor
from rglcd.rewards import register_reward
from rglcd.rewards.base import RewardModel
from rglcd.train import TrainingError, checkpoints, resolve_resume, train
from rglcd.train.build import StudentReward
from rglcd.train.checkpoints import check_safe_to_load

from .test_checkpoints import RunsCode
from .test_cli import run_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=48)


def overrides(tiny, out, **fields):
    base = {
        "model.teacher": tiny / "teacher",
        "data.source": tiny / "data",
        "logging.output_dir": out,
        "optim.batch_size": 4,
        "optim.max_train_steps": 4,
        "logging.checkpointing_steps": 2,
        "logging.validation_steps": 2,
        "logging.log_every": 1,
    }
    base.update({key.replace("__", "."): value for key, value in fields.items()})
    return [f"{key}={value}" for key, value in base.items()]


def run_cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "rglcd", "train", "tiny", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def unet_weights(run):
    return load_file(run / "student" / "unet" / "diffusion_pytorch_model.safetensors")


def test_cli_smoke_run_writes_everything(tiny, tmp_path):
    out = tmp_path / "run"
    finish(run_cli(*overrides(tiny, out)))
    assert load_config(out / "config.yaml").optim.max_train_steps == 4
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["data"][0]["samples_consumed_in_epoch"] > 0
    config = load_config(out / "config.yaml")
    validation = Image.open(out / "validation" / "step-00000002.png")  # prompts × 1, 2, 4 steps, labelled
    tile = config.data.resolution * upscale_factor(config.data.resolution)
    assert validation.width == ROW_LABEL_WIDTH + len(config.logging.validation_prompts) * (tile + GAP) - GAP
    assert validation.height > 3 * tile
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "student" / "model_index.json").is_file() and (out / "target_unet" / "config.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["skipped_samples"] == 0
    card = (out / "student" / "README.md").read_text()  # the model card: diffusers' metadata, training, sampling
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n") and "rg-lcd" in card
    reward = "colorfulness (β 0.1), through the VAE decoder (Alg. 3); on the one-step prediction (the paper)"
    rows = [f"| teacher | `{tiny / 'teacher'}` |", "| training steps × batch | 4 × 4 per process × 1 accumulation |",
            f"| reward | {reward} |", "| guidance range w | [5, 15] (LCM convention) |"]  # fmt: skip
    for row in rows:
        assert row in card, row
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S)[1], namespace)  # its loading example runs as written
    assert namespace["image"].size == (32, 32) and "guidance_scale=11" in card  # w = 10, the range's middle


def test_dry_run_prints_the_resolved_config(tiny, tmp_path):
    result = run_main("train", "tiny", *overrides(tiny, tmp_path / "run"), "--dry-run")
    assert "max_train_steps: 4" in result.stdout
    assert not (tmp_path / "run").exists()


def test_the_reward_term_every_nth_step_and_the_sample_noise_only_there(teacher_dirs):
    from rglcd.models import load_teacher
    from rglcd.step import Distillation, SampleTarget, StepReward

    distillation = Distillation(load_teacher(teacher_dirs["epsilon"]).schedule)
    sample_target = SampleTarget(distillation.sampling_timesteps(2))
    term = StepReward(lambda images, prompts: images.mean((1, 2, 3)), lambda z: z, sample_target)
    reward = StudentReward(term, betas=(1.0,), every=3)
    assert [reward.applies(step) for step in range(7)] == [True, False, False, True, False, False, True]
    assert reward.at(3) is term and reward.at(4) is None
    latents = torch.zeros(2, 4, 8, 8)
    draws = [reward.draw(latents, distillation, torch.Generator().manual_seed(0), step) for step in (3, 4)]
    assert draws[0].sample_noise.shape == (2, 2, 4, 8, 8) and draws[1].sample_noise is None
    assert torch.equal(draws[0].noise, draws[1].noise)  # the step's own draws do not depend on the reward's
    assert not StudentReward(None).applies(0)  # no reward: never, and no sample noise
    assert not StudentReward(term, betas=(0.0, 0.0)).applies(0)  # every β zero: no term to compute


def test_the_configured_betas_are_the_betas_in_the_loss(tiny, teacher_dirs):
    """reward.terms[i].beta in direct mode, reward.latent.beta in latent mode: −mean(R) = −Σ_i β_i·mean(r_i)."""
    from rglcd.models import load_teacher
    from rglcd.rewards import build_reward
    from rglcd.step import Distillation
    from rglcd.train.build import WeightedProxy, build_expert, build_student_reward

    teacher = load_teacher(teacher_dirs["epsilon"])
    distillation = Distillation(teacher.schedule)
    terms = "reward.terms=[{name: colorfulness, beta: 0.5}, {name: colorfulness, beta: 2.0, mean: 0.1, std: 0.5}]"
    config = load_config("tiny", [*overrides(tiny, "unused"), terms])
    reward = build_student_reward(config, build_expert(config), None, teacher.vae, distillation)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    colorfulness = build_reward("colorfulness")(images, [])
    expected = 0.5 * colorfulness + 2.0 * (colorfulness - 0.1) / 0.5
    assert reward.betas == (0.5, 2.0)
    torch.testing.assert_close(reward.at(0).fn(images, []), expected)
    proxy = WeightedProxy(lambda latents, prompts: latents.mean((1, 2, 3)), beta=0.25)
    torch.testing.assert_close(proxy(images, []), 0.25 * images.mean((1, 2, 3)))


def test_interrupted_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = load_config("tiny", overrides(tiny, out, optim__max_train_steps=2, logging__validation_steps=0))
    train(config)
    (out / "student").rename(out / "student-first")

    from accelerate import Accelerator

    def save_half_then_die(self, output_dir, **kwargs):
        (torch.save(torch.zeros(1), f"{output_dir}/half-written.bin"))
        raise KeyboardInterrupt  # as if killed in the middle of writing

    monkeypatch.setattr(Accelerator, "save_state", save_half_then_die)
    config = load_config("tiny", overrides(tiny, out, optim__max_train_steps=4, logging__validation_steps=0))
    with pytest.raises(KeyboardInterrupt):
        train(config, resume="latest")
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]  # the half-written one is never listed
    assert resolve_resume(out, "latest").name == "checkpoint-2"
    stale = out / "checkpoints" / "checkpoint-4.partial"
    assert not stale.exists()  # an interrupted save clears its partial folder
    stale.mkdir()  # what a kill leaves behind instead
    (stale / "half-written.bin").write_bytes(b"")
    monkeypatch.undo()
    train(config, resume="latest")  # resumes from checkpoint-2 and replaces the stale partial folder
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not stale.exists() and not (out / "checkpoints" / "checkpoint-4" / "half-written.bin").exists()


@register_reward("test-nan")
class NanReward(RewardModel):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")


class NanAfterTwoSteps(RewardModel):
    """A reward that turns NaN after the first two steps (one call per step at batch 4)."""

    calls = 0

    def forward(self, images, prompts):
        NanAfterTwoSteps.calls += 1
        return images.mean(dim=(1, 2, 3)) * (1.0 if NanAfterTwoSteps.calls <= 2 else float("nan"))


register_reward("test-nan-after-two-steps")(NanAfterTwoSteps)


def test_nan_losses_stop_the_run_and_its_advice_works(tiny, tmp_path, capsys):
    """Skipped updates, then a stop that names the last good checkpoint; following the advice (a lower β: here the
    reward removed) and resuming finishes the run from that checkpoint."""
    out = tmp_path / "run"
    fields = dict(logging__max_consecutive_nan_steps=3, logging__validation_steps=0, optim__max_train_steps=6)
    nan_reward = "reward.terms=[{name: test-nan-after-two-steps, beta: 1.0}]"
    NanAfterTwoSteps.calls = 0
    named = re.escape(f"the last healthy checkpoint is {out / 'checkpoints' / 'checkpoint-2'}")
    with pytest.raises(TrainingError, match=f"NaN/Inf for 3 steps in a row at step 3; {named}"):
        train(load_config("tiny", [*overrides(tiny, out, **fields), nan_reward]))
    assert [path.name for path in checkpoints(out)] == ["checkpoint-2"]  # nothing saved of the failed state
    train(load_config("tiny", [*overrides(tiny, out, **fields), "reward.terms=[]"]), resume="latest")
    assert "resumed with changed settings: reward.terms [{'name': 'test-nan-after-two-steps'" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 6


def test_an_exploding_learning_rate_stops_naming_a_checkpoint_that_recovers(tiny, tmp_path):
    """A real divergence (learning rate 1e10, checkpoints every step): step 2's update sends |θ| from 1 to 1e9 with a
    finite loss, checkpoint-2 holds those weights, step 3's loss is NaN. The stop names checkpoint-1, the last
    healthy one (resuming checkpoint-2, as "the last checkpoint" would, ends in the same stop every time); following
    the advice to the letter finishes the run."""
    out = tmp_path / "run"
    fields = dict(
        optim__learning_rate=1e10, logging__checkpointing_steps=1, logging__validation_steps=0,
        optim__max_train_steps=6, logging__max_consecutive_nan_steps=2,
    )  # fmt: skip
    with pytest.raises(TrainingError) as stop:
        train(load_config("tiny", overrides(tiny, out, **fields)))
    healthy = out / "checkpoints" / "checkpoint-1"
    assert f"the last healthy checkpoint is {healthy}." in str(stop.value)
    assert f"then resume from it: --resume {healthy}" in str(stop.value)
    states = [json.loads((path / "trainer_state.json").read_text()) for path in checkpoints(out)]
    assert [(state["global_step"], state["healthy"]) for state in states] == [(1, True), (2, False)]
    train(load_config("tiny", overrides(tiny, out, **{**fields, "optim__learning_rate": 1e-4})), resume=str(healthy))
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 6
    assert all(json.loads((path / "trainer_state.json").read_text())["healthy"] for path in checkpoints(out)[-3:])


def test_bad_samples_are_skipped_and_counted(tiny, tmp_path):
    from rglcd.data import write_shards

    data = tmp_path / "data"
    good = list(colour_samples(12, 32, seed=1))
    (shard,) = write_shards(good, data, samples_per_shard=100)
    with open(shard, "r+b") as handle:  # cut the tar in the middle of a member
        handle.truncate(shard.stat().st_size // 2)
    out = tmp_path / "run"
    config = load_config("tiny", overrides(tiny, out, data__source=data, logging__validation_steps=0))
    train(config)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["skipped_samples"] >= 1
    assert "truncated tar member" in summary["skip_reasons"] or "corrupt tar" in summary["skip_reasons"]


def test_missing_teacher_and_empty_data_are_clear_errors(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        train(load_config("tiny", overrides(tiny, tmp_path / "run", data__source=empty)))


def test_training_from_a_cache_matches_training_from_the_images(tiny, tmp_path):
    """`rglcd cache` then `rglcd train` on it: the same latents (up to the VAE's batch-size rounding), embeddings
    and order as from the images, so the same student, without the VAE encoder or text encoder per step."""
    cache = tmp_path / "cache"
    run_main("cache", "--teacher", tiny / "teacher", "--data", tiny / "data", "--out", cache, "--resolution", 32)
    settings = dict(logging__validation_steps=0, data__shuffle_buffer=0)
    train(load_config("tiny", overrides(tiny, tmp_path / "images", **settings)))
    train(load_config("tiny", overrides(tiny, tmp_path / "cached", **settings, data__source=cache)))
    from_images, from_cache = unet_weights(tmp_path / "images"), unet_weights(tmp_path / "cached")
    for key in from_images:
        torch.testing.assert_close(from_cache[key], from_images[key], atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="holds centre crops without flips"):
        train(load_config("tiny", overrides(tiny, tmp_path / "flip", data__source=cache, data__random_flip=True)))


def test_missing_reward_weights_are_a_config_error_before_the_teacher_loads(tiny, tmp_path):
    from rglcd.config import ConfigError

    config = load_config("tiny", overrides(tiny, tmp_path / "run", reward__terms="[{name: aesthetic}]"))
    with pytest.raises(ConfigError, match=r"reward\.terms: aesthetic needs checkpoint=<the head>"):
        train(config)


def test_a_tampered_checkpoint_is_refused_without_running_its_code(tiny, tmp_path):
    """Each file of a checkpoint (and of an FSDP sharded folder) replaced by a pickle that runs code: resume refuses
    it with a one-line TrainingError, and the code never runs."""
    out = tmp_path / "run"
    config = load_config("tiny", overrides(tiny, out, optim__max_train_steps=2, logging__validation_steps=0))
    train(config)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    shutil.rmtree(out / "student")
    planted_in = sorted(path.name for path in checkpoint.iterdir())
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "target.safetensors",
            "generator-0.safetensors", "trainer_state.json"} <= set(planted_in)  # fmt: skip
    marker = tmp_path / "code-ran"
    resume = load_config("tiny", overrides(tiny, out, optim__max_train_steps=4, logging__validation_steps=0))
    for name in planted_in:
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(pickle.dumps(RunsCode(marker)))
        with pytest.raises(TrainingError, match=str(checkpoint)):
            train(resume, resume="latest")
        assert not marker.exists(), f"unpickling {name} ran code"
        (checkpoint / name).write_bytes(original)
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCode(marker)))  # an older rglcd's
    with pytest.raises(TrainingError, match="pickled objects, which this version never loads"):
        train(resume, resume="latest")
    assert not marker.exists()


def test_a_sharded_checkpoint_folder_is_checked_before_torch_unpickles_it(tmp_path):
    """FSDP checkpoints are torch.distributed.checkpoint folders: pickled metadata, and non-tensor entries that
    torch loads without weights_only. Both are checked first."""
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoint-2"
    dcp.save({"w": torch.ones(2), "step": 3}, storage_writer=dcp.FileSystemWriter(checkpoint / "model"), no_dist=True)
    check_safe_to_load(checkpoint, 0)  # a real one passes
    dcp.save({"evil": RunsCode(marker)}, storage_writer=dcp.FileSystemWriter(checkpoint / "other"), no_dist=True)
    with pytest.raises(TrainingError, match="unsafe or damaged"):
        check_safe_to_load(checkpoint, 0)
    shutil.rmtree(checkpoint / "other")
    (checkpoint / "model" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(TrainingError, match="unsafe or damaged"):
        check_safe_to_load(checkpoint, 0)
    assert not marker.exists()


def test_a_run_folder_belongs_to_one_run(tiny, tmp_path):
    """Another run's checkpoints stop a new run before any model loads; --overwrite replaces them; rotation deletes
    only the current run's checkpoints."""
    out = tmp_path / "run"
    first = overrides(tiny, out, logging__validation_steps=0, logging__checkpoints_total_limit=1)
    train(load_config("tiny", first))
    with pytest.raises(
        TrainingError,
        match=r"holds a run \(config.yaml, train_summary.json, student, checkpoints up to checkpoint-4\): continue",
    ):
        train(load_config("tiny", first))
    foreign = out / "checkpoints" / "checkpoint-1"  # another run's, e.g. copied in by hand
    shutil.copytree(out / "checkpoints" / "checkpoint-4", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "run_id": "someone-else"}))
    more = overrides(
        tiny, out, logging__validation_steps=0, logging__checkpoints_total_limit=1, optim__max_train_steps=6
    )
    train(load_config("tiny", more), resume="latest")
    assert [path.name for path in checkpoints(out)] == ["checkpoint-1", "checkpoint-6"]  # 4 was this run's, 1 not
    train(load_config("tiny", first), overwrite=True)
    assert [path.name for path in checkpoints(out)] == ["checkpoint-4"]


def test_resume_takes_changed_settings_and_refuses_fixed_ones(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("tiny", overrides(tiny, out, optim__max_train_steps=2, logging__validation_steps=0)))
    for change, named in (("lora.rank=4", "lora.rank (0 → 4)"), ("data.shuffle_buffer=3", "data.shuffle_buffer")):
        fields = overrides(tiny, out, logging__validation_steps=0)
        with pytest.raises(TrainingError, match=re.escape(named) + ".* cannot change within a run"):
            train(load_config("tiny", [*fields, change]), resume="latest")
    changed = overrides(tiny, out, logging__validation_steps=0, optim__learning_rate=2.5e-5, optim__adam_beta2=0.99)
    train(load_config("tiny", changed), resume="latest")
    printed = capsys.readouterr().out
    assert (
        "resumed with changed settings: optim.adam_beta2 0.999 → 0.99; optim.learning_rate 0.0001 → 2.5e-05" in printed
    )
    optimizer = torch.load(out / "checkpoints" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    (group,) = optimizer["param_groups"]
    assert group["lr"] == pytest.approx(2.5e-5 * 4 / 10) and group["betas"] == (0.9, 0.99)  # warm-up step 4 of 10


def test_the_demo_runs_again_into_its_own_folder(tmp_path, monkeypatch):
    """`rglcd demo` is scratch: run again, it replaces its earlier run instead of refusing the folder. (Two steps,
    checkpointed at the second, where the preset checkpoints every 50.)"""
    from rglcd.experiments import demo

    preset, every_2 = demo.load_config, "logging.checkpointing_steps=2"
    monkeypatch.setattr(demo, "load_config", lambda name, fields: preset(name, [*fields, every_2]))
    state = tmp_path / "demo" / "rglcd" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    demo.run_demo(tmp_path / "demo", steps=2)
    first = json.loads(state.read_text())
    demo.run_demo(tmp_path / "demo", steps=2)
    again = json.loads(state.read_text())
    assert first["run_id"] != again["run_id"]  # the second run's, not the first's kept


def test_a_skipped_step_releases_its_graph_before_the_next_forward(tiny, tmp_path, monkeypatch):
    """A non-finite loss is not backpropagated, so nothing frees its graph but dropping it: kept until the next
    forward has run, two steps' activations would be live at once (an OOM on a config the plan says fits)."""
    from rglcd.train import loop

    losses, alive_at_next_forward = [], []
    original = loop.training_forward

    def recording_forward(*args):
        alive_at_next_forward.extend(loss() is not None for loss in losses)
        losses.clear()
        forward = original(*args)
        losses.append(weakref.ref(forward.output.loss))
        return forward

    monkeypatch.setattr(loop, "training_forward", recording_forward)
    fields = dict(logging__max_consecutive_nan_steps=3, logging__validation_steps=0)
    config = load_config("tiny", [*overrides(tiny, tmp_path / "run", **fields), "reward.terms=[{name: test-nan}]"])
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps in a row"):
        train(config)
    assert alive_at_next_forward == [False, False]


def test_a_full_disk_during_the_export_is_one_line_and_resumes(tiny, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from rglcd.train import loop

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    out = tmp_path / "run"
    config = load_config("tiny", overrides(tiny, out, logging__validation_steps=0))
    monkeypatch.setattr(loop, "export_pipeline", full_disk)
    with pytest.raises(TrainingError, match=r"\(is the disk full\?\).* `--resume latest` repeats the steps from chec"):
        train(config)
    assert not (out / "student").exists()
    monkeypatch.undo()
    train(config, resume="latest")
    assert (out / "student" / "model_index.json").is_file()


@pytest.mark.parametrize("damage", ["string step", "truncated rng state"])
def test_a_damaged_checkpoint_is_one_line_naming_its_file(tiny, tmp_path, damage):
    out = tmp_path / "run"
    fields = dict(optim__max_train_steps=2, logging__validation_steps=0)
    train(load_config("tiny", overrides(tiny, out, **fields)))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    if damage == "string step":
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "global_step": "2"}))
        named = "trainer_state.json is damaged"
    else:
        rng = checkpoint / "random_states_0.pkl"
        rng.write_bytes(rng.read_bytes()[:-1])  # torch.load: OSError "Invalid argument", no file named
        named = f"{checkpoint}: not a checkpoint rglcd wrote"
    more = overrides(tiny, out, **{**fields, "optim__max_train_steps": 4})
    with pytest.raises(TrainingError, match=re.escape(named)):
        train(load_config("tiny", more), resume="latest")
