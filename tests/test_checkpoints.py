"""rglcd.train.checkpoints without a training run: listing, choosing and refusing checkpoints, the trainer state,
rotation, the save/load round trip and the LoRA hooks, with a one-process stand-in for accelerate's Accelerator and
a tiny module. Each test is exact (names, counts, messages) and takes milliseconds."""

import importlib
import io
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rglcd.train import TrainingError
from rglcd.train.checkpoints import (
    FIXED_SETTINGS,
    _MetadataUnpickler,
    check_resume,
    check_safe_to_load,
    checkpoint_adapters_only,
    checkpoints,
    gather_objects,
    is_sharded,
    last_healthy_checkpoint,
    load_checkpoint,
    load_whole,
    read_trainer_state,
    resolve_resume,
    run_id_of,
    same_setting,
    save_checkpoint,
    save_whole,
)

# The module (rglcd.train also exports a function named checkpoints, which hides it as an attribute).
CHECKPOINTS = importlib.import_module("rglcd.train.checkpoints")
STATE = {"global_step": 4, "nan_streak": 0, "data": [{"position": 8}]}


def write_state(folder, state=STATE, text=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps(state) if text is None else text)
    return folder


class RunsCode:
    """Unpickling it runs a shell command: what a tampered checkpoint file could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OneProcess:
    """The part of accelerate's Accelerator the checkpoint functions use, for a single process."""

    is_main_process, process_index, num_processes = True, 0, 1

    def __init__(self):
        self.printed, self.hooks, self.loaded = [], {}, None

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        (torch.save({"weight": torch.ones(1)}, f"{folder}/pytorch_model.bin"))

    def load_state(self, folder):
        self.loaded = folder

    def print(self, text):
        self.printed.append(text)

    def register_save_state_pre_hook(self, hook):
        self.hooks["save"] = hook

    def register_load_state_pre_hook(self, hook):
        self.hooks["load"] = hook


class Stream:
    """A data stream's resumable position."""

    def __init__(self, position):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_checkpoints_are_finished_ones_in_step_order(tmp_path):
    """checkpoint-10 after checkpoint-9 (numbers, not names); a .partial save and other names are never listed."""
    assert checkpoints(tmp_path) == []
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100.partial", "checkpoint-best", "checkpoint-", "x-3"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [path.name for path in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]


def test_resolve_resume_latest_a_folder_or_nothing(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # no checkpoint yet: a fresh start
    for step in (2, 10, 4):
        write_state(tmp_path / "checkpoints" / f"checkpoint-{step}")
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "checkpoint-10"
    named = tmp_path / "checkpoints" / "checkpoint-2"
    assert resolve_resume(tmp_path, str(named)) == named
    (tmp_path / "half").mkdir()
    message = f"--resume {tmp_path / 'half'}: not a finished rglcd checkpoint (no trainer_state.json)"
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        resolve_resume(tmp_path, str(tmp_path / "half"))


def test_same_setting_takes_a_path_given_two_ways_and_nothing_else(tmp_path, monkeypatch):
    """A path setting given relative and absolute is the same (when it exists); other settings compare by value."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert same_setting("optim.learning_rate", 1e-4, 1e-4)
    assert not same_setting("optim.learning_rate", 1e-4, 2e-4)
    for key in ("model.teacher", "data.source", "reward.latent.model", "logging.output_dir"):
        assert same_setting(key, "data", str(tmp_path / "data"))
    assert not same_setting("data.source", "missing", str(tmp_path / "missing"))  # not there: cannot tell
    assert not same_setting("data.source", "data", str(tmp_path))
    assert not same_setting("model.name", "data", str(tmp_path / "data"))  # not a path setting
    assert not same_setting("data.source", "data", None)
    assert not same_setting("data.source", None, "data")


def test_fixed_settings_are_the_ones_a_resume_cannot_change():
    assert "model.teacher".startswith(FIXED_SETTINGS) and "seed".startswith(FIXED_SETTINGS)
    assert "distill.num_ddim_timesteps".startswith(FIXED_SETTINGS)
    assert not "optim.learning_rate".startswith(FIXED_SETTINGS)


MISSING, NOT_WHOLE = (
    "global_step, nan_streak or data is missing",
    "global_step and nan_streak must be whole numbers, data a list",
)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{", None),  # json's own message
        ("[]", MISSING),
        (json.dumps({"global_step": 1, "nan_streak": 0}), MISSING),
        (json.dumps({**STATE, "global_step": -1}), NOT_WHOLE),
        (json.dumps({**STATE, "nan_streak": -1}), NOT_WHOLE),
        (json.dumps({**STATE, "global_step": True}), NOT_WHOLE),
        (json.dumps({**STATE, "nan_streak": 1.0}), NOT_WHOLE),
        (json.dumps({**STATE, "data": {}}), NOT_WHOLE),
    ],
)
def test_a_damaged_trainer_state_is_one_error_naming_the_file(tmp_path, text, why):
    checkpoint = write_state(tmp_path / "checkpoint-4", text=text)
    with pytest.raises(TrainingError) as raised:
        read_trainer_state(checkpoint)
    message, start = str(raised.value), f"{checkpoint / 'trainer_state.json'} is damaged ("
    assert message.startswith(start) and message.endswith("); resume from another checkpoint")
    if why is not None:
        assert message == f"{start}{why}); resume from another checkpoint"


def test_a_trainer_state_with_zero_counts_is_read(tmp_path):
    state = {"global_step": 0, "nan_streak": 0, "data": []}
    assert read_trainer_state(write_state(tmp_path / "checkpoint-0", state)) == state
    with pytest.raises(TrainingError, match="is damaged"):
        read_trainer_state(tmp_path / "missing")


def test_check_resume_refuses_another_process_count_or_sharding(tmp_path):
    checkpoint = write_state(tmp_path / "checkpoint-4", {**STATE, "data": [{}, {}]})
    message = f"{checkpoint} was saved by 2 processes and this run has 1; resume with the same number of processes"
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        check_resume(checkpoint, {}, 1, False)
    assert check_resume(checkpoint, {}, 2, False)[0]["data"] == [{}, {}]
    saved_whole = f"{checkpoint} was saved with DDP and this run uses FSDP; resume with the accelerate config"
    with pytest.raises(TrainingError, match=f"^{re.escape(saved_whole)} the run started with$"):
        check_resume(checkpoint, {}, 2, True)
    write_state(checkpoint, {**STATE, "fsdp": True})
    saved_sharded = f"{checkpoint} was saved with FSDP and this run uses DDP; resume with the accelerate config"
    with pytest.raises(TrainingError, match=f"^{re.escape(saved_sharded)} the run started with$"):
        check_resume(checkpoint, {}, 1, False)
    assert check_resume(checkpoint, {}, 1, True)[0]["fsdp"] is True


def test_check_resume_returns_the_changed_settings_and_refuses_fixed_ones(tmp_path):
    saved = {"optim.learning_rate": 1e-4, "optim.max_steps": 4, "seed": 0, "model.teacher": "t", "gone": 1}
    checkpoint = write_state(tmp_path / "checkpoint-4", {**STATE, "settings": saved})
    now = {**saved, "optim.learning_rate": 2e-4, "optim.max_steps": 8, "new": 2}
    del now["gone"]
    state, changed = check_resume(checkpoint, now, 1, False)
    assert state["global_step"] == 4
    assert list(changed.items()) == [
        ("gone", (1, None)),
        ("new", (None, 2)),
        ("optim.learning_rate", (1e-4, 2e-4)),
        ("optim.max_steps", (4, 8)),
    ]
    message = (
        f"--resume {checkpoint}: model.teacher (t → u), seed (0 → 1) cannot change within a run; resume with the "
        "checkpoint's value(s), or start a new run in another logging.output_dir"
    )
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        check_resume(checkpoint, {**now, "seed": 1, "model.teacher": "u"}, 1, False)
    old = write_state(tmp_path / "checkpoint-2", STATE)  # written before settings were saved: nothing to compare
    assert check_resume(old, {"seed": 5}, 1, False) == (STATE, {})


def test_check_resume_takes_a_path_setting_given_another_way_as_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    checkpoint = write_state(tmp_path / "checkpoint-4", {**STATE, "settings": {"data.source": "data"}})
    assert check_resume(checkpoint, {"data.source": str(tmp_path / "data")}, 1, False) == (
        {**STATE, "settings": {"data.source": "data"}}, {},
    )  # fmt: skip


def test_last_healthy_checkpoint_and_run_id(tmp_path):
    """The newest checkpoint whose state says healthy (or says nothing: older checkpoints); unreadable ones are
    passed over."""
    assert last_healthy_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    write_state(folder / "checkpoint-1", {**STATE, "healthy": True, "run_id": "a"})
    write_state(folder / "checkpoint-2", {**STATE, "run_id": "a"})  # before the health record
    write_state(folder / "checkpoint-3", {**STATE, "healthy": False, "run_id": "a"})
    write_state(folder / "checkpoint-4", text="{")
    write_state(folder / "checkpoint-5", text="[]")
    (folder / "checkpoint-6").mkdir()
    assert last_healthy_checkpoint(tmp_path) == folder / "checkpoint-2"
    write_state(folder / "checkpoint-2", {**STATE, "healthy": "yes"})  # only True is healthy
    assert last_healthy_checkpoint(tmp_path) == folder / "checkpoint-1"
    assert run_id_of(folder / "checkpoint-1") == "a"
    assert run_id_of(folder / "checkpoint-2") is None
    assert [run_id_of(folder / f"checkpoint-{n}") for n in (4, 5, 6)] == [None, None, None]


def save(out, step, keep=2, run_id="a", healthy=True, **kwargs):
    accelerator, module = OneProcess(), nn.Linear(2, 2)
    state = {"global_step": step, "nan_streak": 0, "run_id": run_id, "healthy": healthy}
    args = (accelerator, out, state, Stream(step), torch.Generator().manual_seed(step), keep)
    return save_checkpoint(*args, kwargs.get("modules", {"ema": module}), kwargs.get("optimizers", {}))


def test_save_checkpoint_writes_every_part_and_renames_when_complete(tmp_path):
    module = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    final = save(tmp_path, 3, modules={"ema": module}, optimizers={"proxy_optimizer": optimizer})
    assert final == tmp_path / "checkpoints" / "checkpoint-3"
    assert sorted(path.name for path in final.iterdir()) == [
        "ema.safetensors", "generator-0.safetensors", "proxy_optimizer.pt", "pytorch_model.bin", "trainer_state.json",
    ]  # fmt: skip
    assert not (tmp_path / "checkpoints" / "checkpoint-3.partial").exists()
    assert json.loads((final / "trainer_state.json").read_text()) == {
        "global_step": 3, "nan_streak": 0, "run_id": "a", "healthy": True, "data": [{"position": 3}],
    }  # fmt: skip
    assert torch.equal(load_file(final / "ema.safetensors")["weight"], module.weight)
    generator_state = load_file(final / "generator-0.safetensors")["state"]
    assert torch.equal(generator_state, torch.Generator().manual_seed(3).get_state())
    momentum = torch.load(final / "proxy_optimizer.pt", weights_only=True)["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state[module.weight]["momentum_buffer"])


def test_rotation_keeps_the_newest_of_this_run_and_the_last_healthy(tmp_path):
    save(tmp_path, 1, run_id="other")
    save(tmp_path, 2, healthy=True)
    for step in (3, 4, 5):
        save(tmp_path, step, healthy=False)
    names = [path.name for path in checkpoints(tmp_path)]
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-4", "checkpoint-5"]  # 3 rotated; 2 healthy
    save(tmp_path, 6, keep=1, healthy=True)
    assert [path.name for path in checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-6"]


def test_another_rank_writes_into_the_main_processs_partial_folder(tmp_path):
    """A rank other than the main one writes its generator into checkpoint-N.partial (which the main process may
    have made already) and renames nothing; the trainer state is the main process's to write."""

    class Rank1(OneProcess):
        is_main_process, process_index = False, 1

    partial = tmp_path / "checkpoints" / "checkpoint-2.partial"
    partial.mkdir(parents=True)
    state = {"global_step": 2, "nan_streak": 0, "run_id": "a"}
    final = save_checkpoint(Rank1(), tmp_path, state, Stream(0), torch.Generator(), 2, {"ema": nn.Linear(2, 2)}, {})
    assert final == tmp_path / "checkpoints" / "checkpoint-2" and not final.exists()
    assert sorted(path.name for path in partial.iterdir()) == ["generator-1.safetensors", "pytorch_model.bin"]


def test_a_failed_save_is_one_error_and_leaves_no_folder(tmp_path):
    class FullDisk(OneProcess):
        def save_state(self, folder):
            raise OSError(28, "No space left on device")

    state = {"global_step": 2, "nan_streak": 0, "run_id": "a"}
    final = tmp_path / "checkpoints" / "checkpoint-2"
    message = f"could not write {final} (is the disk full or the folder read-only?): [Errno 28] No space left on device"
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        save_checkpoint(FullDisk(), tmp_path, state, Stream(0), torch.Generator(), 2, {}, {})
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == []


def test_load_checkpoint_restores_what_save_wrote(tmp_path):
    module, generator, stream = nn.Linear(2, 2), torch.Generator().manual_seed(0), Stream(7)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    weight, momentum = module.weight.detach().clone(), optimizer.state[module.weight]["momentum_buffer"].clone()
    state = {"global_step": 7, "nan_streak": 0, "run_id": "a"}
    final = save_checkpoint(OneProcess(), tmp_path, state, stream, generator, 2, {"ema": module}, {"opt": optimizer})
    expected_draw = torch.rand(3, generator=generator)
    with torch.no_grad():
        module.weight.zero_()
    optimizer.state[module.weight]["momentum_buffer"].zero_()
    stream.position = 0
    accelerator = OneProcess()
    load_checkpoint(
        accelerator, final, read_trainer_state(final), stream, generator, {"ema": module}, {"opt": optimizer}
    )
    assert accelerator.loaded == str(final) and accelerator.printed == [f"resumed from {final} at step 7"]
    assert torch.equal(module.weight, weight) and stream.position == 7
    assert torch.equal(optimizer.state[module.weight]["momentum_buffer"], momentum)
    assert torch.equal(torch.rand(3, generator=generator), expected_draw)  # the generator continues where it was


def test_a_checkpoint_missing_a_file_cannot_be_resumed(tmp_path):
    """One line naming the checkpoint, the error's type and its first 300 characters (a long path here)."""
    module, generator, out = nn.Linear(2, 2), torch.Generator(), tmp_path / ("long" * 40) / ("path" * 40)
    state = {"global_step": 1, "nan_streak": 0, "run_id": "a"}
    final = save_checkpoint(OneProcess(), out, state, Stream(0), generator, 2, {"ema": module}, {})
    (final / "generator-0.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as raised:
        load_file(final / "generator-0.safetensors")
    assert len(str(raised.value)) > 300
    message = f"{final} cannot be resumed (FileNotFoundError: {str(raised.value)[:300]})"
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        load_checkpoint(OneProcess(), final, read_trainer_state(final), Stream(0), generator, {"ema": module}, {})


def test_load_checkpoint_checks_this_ranks_files_before_loading_anything(tmp_path):
    """An RNG state file that needs code to unpickle is refused before accelerate or the optimizers load anything;
    an optimizer file holding a pickled object is refused by torch.load's weights_only (the code never runs)."""
    marker, module = tmp_path / "code-ran", nn.Linear(2, 2)
    state = {"global_step": 1, "nan_streak": 0, "run_id": "a"}
    final = save_checkpoint(OneProcess(), tmp_path, state, Stream(0), torch.Generator(), 2, {"ema": module}, {})
    (final / "random_states_0.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    accelerator = OneProcess()
    with pytest.raises(TrainingError, match="not a checkpoint rglcd wrote"):
        load_checkpoint(accelerator, final, read_trainer_state(final), Stream(0), torch.Generator(), {}, {})
    assert accelerator.loaded is None
    (final / "random_states_0.pkl").unlink()
    (final / "opt.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match=r"cannot be resumed \(UnpicklingError: "):
        load_checkpoint(
            OneProcess(), final, read_trainer_state(final), Stream(0), torch.Generator(), {}, {"opt": optimizer}
        )
    assert not marker.exists()


def test_pickled_objects_are_refused_before_anything_loads(tmp_path):
    """An older rglcd's custom_checkpoint_N.pkl, and an RNG state file that needs code to unpickle (of this rank
    only), are refused without running it; a real RNG state file (tensors) passes."""
    marker, checkpoint = tmp_path / "code-ran", tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    torch.save({"torch_manual_seed": torch.get_rng_state()}, checkpoint / "random_states_0.pkl")
    check_safe_to_load(checkpoint, 0)
    (checkpoint / "random_states_1.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    check_safe_to_load(checkpoint, 0)  # another rank's file is that rank's to check
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(checkpoint))}: not a checkpoint rglcd wrote \(unsafe"):
        check_safe_to_load(checkpoint, 1)
    for name in ("custom_checkpoint_1.pkl", "custom_checkpoint_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(RunsCode(marker)))
    message = (
        f"{checkpoint} holds custom_checkpoint_0.pkl, custom_checkpoint_1.pkl: pickled objects, which this version "
        "never loads (they can run code); it was written by an older rglcd: resume it with that version, or start "
        "the run again"
    )
    with pytest.raises(TrainingError, match=f"^{re.escape(message)}$"):
        check_safe_to_load(checkpoint, 0)
    assert not marker.exists()


@pytest.mark.parametrize("value", [torch.Size([2, 3]), torch.float16, torch.bfloat16, __import__("pathlib").Path("a")])
def test_sharded_metadata_unpickles_its_own_types(value):
    assert _MetadataUnpickler(io.BytesIO(pickle.dumps(value))).load() == value


@pytest.mark.parametrize("value", [nn.Identity(), torch.nn.functional.relu, "torch.Tensor"])
def test_sharded_metadata_refuses_anything_else(value):
    """A module, a function and torch's Tensor class (not a dtype) are refused, with the global's name."""
    data = pickle.dumps(torch.Tensor if value == "torch.Tensor" else value)
    with pytest.raises(pickle.UnpicklingError, match=r"is not part of a checkpoint's metadata$"):
        _MetadataUnpickler(io.BytesIO(data)).load()


class Sharded(nn.Module):
    """A module whose weights look like FSDP2's (DTensors have full_tensor)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.weight.full_tensor = lambda: self.weight


def test_sharded_modules_are_gathered_and_scattered_through_torch_distributed(tmp_path, monkeypatch):
    """A sharded module's whole weights are gathered (a collective) and written by the main process only; loading,
    the main process reads the file and torch broadcasts it to the others' shards (they pass nothing)."""
    module, whole = Sharded(), {"weight": torch.arange(6.0).view(2, 3).t()}  # not contiguous: saved contiguous
    assert is_sharded(module) and not is_sharded(nn.Linear(1, 1))
    monkeypatch.setattr(CHECKPOINTS, "whole_state_dict", lambda m: whole if m is module else None)
    save_whole(module, tmp_path / "other.safetensors", main=False)
    assert not (tmp_path / "other.safetensors").exists()
    save_whole(module, tmp_path / "ema.safetensors", main=True)
    assert torch.equal(load_file(tmp_path / "ema.safetensors")["weight"], whole["weight"])
    calls = []
    monkeypatch.setattr(CHECKPOINTS, "set_model_state_dict", lambda *args, **kwargs: calls.append((args, kwargs)))
    load_whole(module, tmp_path / "ema.safetensors", main=True)
    load_whole(module, tmp_path / "missing.safetensors", main=False)
    (loaded, main_options), (other, other_options) = ((args[1], kwargs["options"]) for args, kwargs in calls)
    assert all(args[0] is module for args, _ in calls)
    assert torch.equal(loaded["weight"], whole["weight"]) and other == {}
    for options in (main_options, other_options):
        assert options.full_state_dict is True and options.broadcast_from_rank0 is True


def test_whole_weights_are_gathered_whole_onto_the_cpu(monkeypatch):
    """What torch is asked for (full_state_dict, cpu_offload: FSDP2's shards gathered on the CPU; the gathering
    itself needs processes, tests/test_distributed.py); an unsharded module's is its state dict."""
    module = nn.Linear(2, 2)
    whole = CHECKPOINTS.whole_state_dict(module)
    assert whole.keys() == {"weight", "bias"} and torch.equal(whole["weight"], module.weight)
    calls = []
    monkeypatch.setattr(CHECKPOINTS, "get_model_state_dict", lambda *args, **kwargs: calls.append((args, kwargs)))
    CHECKPOINTS.whole_state_dict(module)
    ((args, kwargs),) = calls
    assert args == (module,) and kwargs["options"].full_state_dict is True and kwargs["options"].cpu_offload is True


def test_a_sharded_module_is_saved_whole_and_read_back_by_the_main_process(tmp_path, monkeypatch):
    module, state = Sharded(), {"global_step": 1, "nan_streak": 0, "run_id": "a"}
    monkeypatch.setattr(CHECKPOINTS, "whole_state_dict", lambda m: {"weight": torch.full((2,), 3.0)})
    final = save_checkpoint(OneProcess(), tmp_path, state, Stream(0), torch.Generator(), 2, {"ema": module}, {})
    loaded = []
    monkeypatch.setattr(CHECKPOINTS, "set_model_state_dict", lambda m, weights, options: loaded.append(weights))
    load_checkpoint(OneProcess(), final, read_trainer_state(final), Stream(0), torch.Generator(), {"ema": module}, {})
    assert [weights["weight"].tolist() for weights in loaded] == [[3.0, 3.0]]


def test_objects_of_every_rank_are_gathered_in_rank_order(monkeypatch):
    class TwoProcesses(OneProcess):
        num_processes = 2

    def all_gather_object(gathered, value):
        assert gathered == [None, None]
        gathered[:] = [value, {"position": 9}]

    monkeypatch.setattr(CHECKPOINTS.dist, "all_gather_object", all_gather_object)
    assert gather_objects(TwoProcesses(), {"position": 3}) == [{"position": 3}, {"position": 9}]


def test_whole_modules_round_trip_and_only_the_main_process_writes(tmp_path):
    conv = nn.Conv2d(2, 2, 3).to(memory_format=torch.channels_last)  # weights that are not contiguous
    save_whole(conv, tmp_path / "conv.safetensors", main=True)
    assert torch.equal(load_file(tmp_path / "conv.safetensors")["weight"], conv.weight)
    module = nn.Linear(2, 3)
    assert not is_sharded(module)
    save_whole(module, tmp_path / "other.safetensors", main=False)
    assert not (tmp_path / "other.safetensors").exists()
    save_whole(module, tmp_path / "ema.safetensors", main=True)
    copy = nn.Linear(2, 3)
    load_whole(copy, tmp_path / "ema.safetensors", main=True)
    assert torch.equal(copy.weight, module.weight) and torch.equal(copy.bias, module.bias)
    assert gather_objects(OneProcess(), {"position": 3}) == [{"position": 3}]


class Adapted(nn.Module):
    """A base layer with a LoRA adapter, named as peft names them (``….lora_A.default.weight``)."""

    def __init__(self, rank=2):
        super().__init__()
        self.layer = nn.Module()
        self.layer.base = nn.Linear(3, 3)
        self.layer.lora_A = nn.ModuleDict({"default": nn.Linear(3, rank, bias=False)})


def test_lora_checkpoints_hold_the_adapters_only_and_load_them(tmp_path):
    accelerator, student = OneProcess(), Adapted()
    checkpoint_adapters_only(accelerator)
    weights = [student.state_dict(), {"other.lora_B.weight": torch.ones(1), "other.weight": torch.ones(1)}]
    accelerator.hooks["save"]([student], weights, str(tmp_path))
    assert [list(state) for state in weights] == [["layer.lora_A.default.weight"], ["other.lora_B.weight"]]
    save_file(weights[0], tmp_path / "model.safetensors")
    other, models = Adapted(), []
    models[:] = [other, nn.Linear(1, 1)]
    accelerator.hooks["load"](models, str(tmp_path))
    assert len(models) == 1  # the student is taken out: accelerate does not load it again
    assert torch.equal(other.layer.lora_A["default"].weight, student.layer.lora_A["default"].weight)
    assert not torch.equal(other.layer.base.weight, student.layer.base.weight)  # the base is the teacher's


def test_lora_checkpoints_of_another_rank_or_modules_are_refused(tmp_path):
    accelerator = OneProcess()
    checkpoint_adapters_only(accelerator)
    path = tmp_path / "model.safetensors"
    wrong = f"{path} does not hold this run's adapters (lora.rank or lora.target_modules changed?)"
    save_file({"layer.lora_A.default.weight": torch.ones(4, 3)}, path)  # rank 4, the run's is 2
    with pytest.raises(TrainingError, match=f"^{re.escape(wrong)}: "):
        accelerator.hooks["load"]([Adapted()], str(tmp_path))
    student = Adapted()
    student.layer.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False)})
    save_file({"layer.lora_A.default.weight": torch.ones(4, 3), "layer.lora_B.default.weight": torch.ones(3, 4)}, path)
    with pytest.raises(RuntimeError) as raised:  # two shapes that differ: a message over 300 characters
        student.load_state_dict(load_file(path), strict=False)
    assert len(str(raised.value)) > 300
    with pytest.raises(TrainingError, match=f"^{re.escape(f'{wrong}: {str(raised.value)[:300]}')}$"):
        accelerator.hooks["load"]([student], str(tmp_path))
    save_file({"layer.lora_A.default.weight": torch.ones(2, 3), "layer.lora_C.weight": torch.ones(1)}, path)
    with pytest.raises(TrainingError, match=f"^{re.escape(wrong)}: 1 unexpected, 0 missing tensors$"):
        accelerator.hooks["load"]([Adapted()], str(tmp_path))
    save_file({"layer.base.weight": torch.ones(3, 3)}, path)
    with pytest.raises(TrainingError, match=f"^{re.escape(wrong)}: 0 unexpected, 1 missing tensors$"):
        accelerator.hooks["load"]([Adapted()], str(tmp_path))
