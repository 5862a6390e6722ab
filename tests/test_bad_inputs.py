"""Bad inputs, as a hostile-but-fair user gives them: each is a one-line error naming the fix, exit code 2, no
traceback, and nothing half-written left behind. ``RGLCD_DEBUG=1`` shows the traceback instead."""

import errno
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import Accelerator
from PIL import Image

from rglcd.cli import main
from rglcd.config import load_config
from rglcd.data.sources import open_source
from rglcd.experiments.demo import tiny_setup
from rglcd.train import train


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny teacher, its data, a 2-step run with a checkpoint, and bad files of every kind."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny = tiny_setup(root / "tiny", samples=16)
    run = root / "run"
    fields = {
        "model.teacher": tiny / "teacher", "data.source": tiny / "data", "logging.output_dir": run,
        "optim.batch_size": 4, "optim.max_train_steps": 2, "logging.checkpointing_steps": 2,
        "logging.validation_steps": 0,
    }  # fmt: skip
    train_args = [f"{key}={value}" for key, value in fields.items()]
    train(load_config("tiny", train_args))
    (root / "syntax.yaml").write_text("model:\n  teacher: [unclosed\n")
    (root / "tagged.yaml").write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (root / "latin1.tsv").write_bytes(b"Prompt\tCategory\ncaf\xe9\tFood\n")
    (root / "utf16.yaml").write_text("seed: 1\n", encoding="utf-16")  # what Windows' Notepad may save
    for name, key, value in (
        ("custom-module", "unet", ["my_module", "MyUNet"]),  # diffusers refuses to import it
        ("unknown-pipeline", "_class_name", "NoSuchPipeline"),
        ("custom-pipeline", "_class_name", ["my_pipeline", "MyPipeline"]),
    ):
        shutil.copytree(run / "student", root / name)
        index = json.loads((root / name / "model_index.json").read_text())
        (root / name / "model_index.json").write_text(json.dumps({**index, key: value}))
    (root / "damaged-teacher" / "vae").mkdir(parents=True)
    (root / "damaged-teacher" / "vae" / "config.json").write_text('{"block_out_channels": [32, ')
    (root / "midless-teacher" / "unet").mkdir(parents=True)
    (root / "midless-teacher" / "unet" / "config.json").write_text('{"mid_block_type": null}')
    (root / "prompts.txt").write_text("a red square\n")
    (root / "prompts-folder").mkdir()
    (root / "a-file").write_text("")
    return SimpleNamespace(
        root=root, teacher=tiny / "teacher", data=tiny / "data", run=run, student=run / "student", args=train_args
    )


def cases(made) -> dict[str, tuple[list[str], str]]:
    """name: (rglcd's arguments, what the one-line error says)."""
    sample = ["sample", "--model", str(made.student), "--out", str(made.root / "samples"), "--prompt", "a cat"]
    train_run = ["train", "tiny", *made.args]
    elsewhere = [arg for arg in made.args if not arg.startswith("logging.output_dir=")]
    evaluate = ["eval", "--model", str(made.student), "--prompts", str(made.root / "prompts.txt"), "--out"]
    cache = ["cache", "--teacher", str(made.teacher), "--data", str(made.data), "--out", str(made.root / "c")]
    return {
        "yaml syntax": (["train", str(made.root / "syntax.yaml")], "not a YAML config rglcd can read"),
        "yaml python tag": (["train", str(made.root / "tagged.yaml")], "not a YAML config rglcd can read"),
        "missing config": (["train", "nowhere.yaml"], "is neither a YAML file nor a preset"),
        "utf-16 config": (["train", str(made.root / "utf16.yaml")], "not UTF-8 text"),
        "latin-1 parti prompts": (
            [*evaluate[:4], f"parti:{made.root / 'latin1.tsv'}", "--out", str(made.root / "e")],
            "latin1.tsv: not UTF-8 text",
        ),
        "latin-1 coco captions": (
            [*evaluate[:4], f"coco:{made.root / 'latin1.txt'}", "--out", str(made.root / "e")],
            "latin1.txt: not UTF-8 text",
        ),
        "negative seed": ([*train_run, "seed=-1"], "seed: must be from 0 to 4294967295"),
        "seed beyond numpy's": ([*train_run, "seed=99999999999"], "seed: must be from 0 to 4294967295"),
        "teacher's vae config damaged": (
            [*train_run, f"model.teacher={made.root / 'damaged-teacher'}"],
            "vae/config.json: not a diffusers VAE config (JSONDecodeError",
        ),
        "unknown field": ([*train_run, "optim.learning_rat=1"], "did you mean optim.learning_rate?"),
        "bad override": ([*train_run, "optim.batch_size"], "must look like section.field=value"),
        "override not yaml": ([*train_run, "optim.batch_size=[1"], "the value is not YAML"),
        "infinite learning rate": ([*train_run, "optim.learning_rate=.inf"], "must be a finite number"),
        "nan beta": ([*train_run, "reward.terms=[{name: colorfulness, beta: .nan}]"], "must be a finite number"),
        "unknown dmd field": ([*train_run, "dmd.fake_rank=4"], "did you mean dmd.fake_lora_rank?"),
        "negative dmd weight": ([*train_run, "dmd.weight=-1"], "dmd.weight: must be >= 0"),
        "dmd noise range reversed": ([*train_run, "dmd.t_min=0.9", "dmd.t_max=0.1"], "need 0 <= t_min < t_max <= 1"),
        "no fake network update": ([*train_run, "dmd.weight=1", "dmd.fake_updates=0"], "dmd.fake_updates: must be in"),
        "real guidance below one": ([*train_run, "dmd.real_guidance=0.5"], "dmd.real_guidance: must be >= 1"),
        "every weight zero": ([*train_run, "distill.lcd_weight=0", "reward.terms=[]"], "the loss has no term"),
        "gan without a mid-block": (
            [*train_run, "gan.weight=0.1", f"model.teacher={made.root / 'midless-teacher'}"],
            "this teacher's UNet has none",
        ),
        "resume nowhere": ([*train_run, "--resume", "/nonexistent"], "not a finished rglcd checkpoint"),
        "another run's folder": (
            train_run,
            "holds a run (config.yaml, train_summary.json, student, checkpoints up to checkpoint-2)",
        ),
        "resume changes lora.rank": ([*train_run, "lora.rank=4", "--resume", "latest"], "cannot change within a run"),
        "resume changes shuffling": (
            [*train_run, "data.shuffle_buffer=7", "--resume", "latest"],
            "data.shuffle_buffer (64 → 7) cannot change",
        ),
        "output under a file": (
            ["train", "tiny", *elsewhere, f"logging.output_dir={made.root / 'a-file' / 'run'}"],
            "Not a directory",
        ),
        "prompts file missing": ([*sample, "--prompts-file", "nowhere.txt"], "no such file"),
        "prompts file a folder": ([*sample, "--prompts-file", str(made.root / "prompts-folder")], "a folder"),
        "prompts file not utf-8": ([*sample, "--prompts-file", str(made.root / "latin1.txt")], "not UTF-8"),
        "no prompt": (sample[:5], "give at least one --prompt"),
        "zero images": ([*sample, "--num-images", "0"], "must be at least 1"),
        "negative resolution": ([*sample, "--resolution", "-8"], "must be at least 1"),
        "resolution off the latent grid": (
            [*sample, "--resolution", "30"],
            "--resolution 30 must be a positive multiple of the VAE factor 4",
        ),
        "huge sample seed": ([*sample, "--seed", str(10**23)], "--seed: must be from 0 to 4294967295"),
        "negative sample seed": ([*sample, "--seed", "-1"], "--seed: must be from 0 to 4294967295"),
        "custom module": (
            ["sample", "--model", str(made.root / "custom-module"), "--out", "s", "--prompt", "a"],
            "my_module is not one of the libraries",
        ),
        "unknown pipeline class": (
            ["sample", "--model", str(made.root / "unknown-pipeline"), "--out", "s", "--prompt", "a"],
            "has no attribute NoSuchPipeline",
        ),
        "custom pipeline": (
            ["sample", "--model", str(made.root / "custom-pipeline"), "--out", "s", "--prompt", "a"],
            "diffusers cannot load this pipeline",
        ),
        "bogus device": ([*sample, "--device", "bogus"], "not a device"),
        "nan guidance": ([*sample, "--guidance", "nan"], "expected a finite number"),
        "steps out of range": ([*sample, "--steps", "9"], "invalid choice"),
        "missing model": (["sample", "--model", "nowhere", "--out", "x", "--prompt", "a"], "nowhere"),
        "eval batch size 0": ([*evaluate, "o", "--batch-size", "0"], "must be at least 1"),
        "eval steps beyond the grid": ([*evaluate, str(made.root / "e"), "--steps", "100"], "samples at most 50"),
        "eval unknown metric": ([*evaluate, str(made.root / "e"), "--metrics", "nope"], "unknown metric(s) nope"),
        "eval prompts not utf-8": (
            ["eval", "--model", str(made.student), "--prompts", str(made.root / "latin1.txt")],
            "not UTF-8",
        ),
        "eval prompts missing": (["eval", "--model", str(made.student), "--prompts", "none.txt"], "neither a known"),
        "eval world:0": (["eval", "--model", str(made.student), "--prompts", "world:0"], "positive number"),
        "eval resolution 1": (
            [*evaluate, "e1", "--resolution", "1", "--metrics", "hf_ratio"],
            "student: --resolution 1 must be a positive multiple of the VAE factor 4",
        ),
        "eval resolution off the latent grid": (  # it wrote 28-pixel images under a manifest saying 30
            [*evaluate, "e30", "--resolution", "30", "--metrics", "hf_ratio"],
            "student: --resolution 30 must be a positive multiple of the VAE factor 4",
        ),
        "eval custom module": (
            ["eval", "--model", str(made.root / "custom-module"), *evaluate[3:], "e", "--metrics", "hf_ratio"],
            "my_module is not one of the libraries",
        ),
        "serve port beyond 65535": (["serve", "--model", str(made.student), "--port", "99999"], "at most 65535"),
        "cache off the latent grid": ([*cache, "--resolution", "30"], "must be a multiple of the VAE's 4"),
        "cache into an existing folder": (
            [*cache[:-1], str(made.root / "a-file"), "--resolution", "32"],
            "already exists",
        ),
        "world data negative samples": (["world", "data", "--out", "w", "--samples", "-1"], "must be at least 1"),
        "plan bad utilization": (["plan", "sd15-512", "--utilization", "2"], "a share of the GPU's peak"),
        "lrm pretrain without a cache": (
            ["lrm", "pretrain", "--cache", str(made.data), "--out", "l"],
            "cache_info.json",
        ),
    }


# The names, for the parametrisation (paths do not matter for them).
CASE_NAMES = list(cases(SimpleNamespace(root=Path(), teacher=Path(), data=Path(), run=Path(), student=Path(), args=[])))


def rglcd_lines(stderr: str) -> list[str]:
    """rglcd's own lines on stderr (besides them: argparse's usage, progress bars, which redraw with carriage
    returns)."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("rglcd ")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_input_is_a_one_line_error(made, name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RGLCD_DEBUG", raising=False)
    args, says = cases(made)[name]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    lines = rglcd_lines(error)
    assert len(lines) == 1, error
    assert says in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()


def test_compiling_without_a_cpp_compiler_is_one_line(made, capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["sample", "--model", str(made.student), "--prompt", "x", "--compile", "--out", str(tmp_path / "s")])
    assert stopped.value.code == 2
    (line,) = rglcd_lines(capsys.readouterr().err)
    assert "--compile on the CPU needs a C++ compiler" in line
    assert not (tmp_path / "s").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_folder(made, capsys, monkeypatch):
    def disk_full(self, output_dir, **kwargs):
        (made.root / "run-full" / "checkpoints" / "checkpoint-2.partial" / "half.bin").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    args = [arg for arg in made.args if not arg.startswith("logging.output_dir=")]
    with pytest.raises(SystemExit):
        main(["train", "tiny", *args, f"logging.output_dir={made.root / 'run-full'}"])
    (line,) = rglcd_lines(capsys.readouterr().err)
    assert line.startswith("rglcd train: could not write") and "is the disk full" in line
    assert not list((made.root / "run-full" / "checkpoints").iterdir())


def test_rglcd_debug_shows_the_traceback(made, monkeypatch):
    monkeypatch.setenv("RGLCD_DEBUG", "1")
    with pytest.raises(Exception, match="not a YAML config rglcd can read"):
        main(["train", str(made.root / "syntax.yaml")])


def test_a_damaged_trainer_state_is_one_line(made, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made.run, run)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    args = [arg for arg in made.args if not arg.startswith("logging.output_dir=")]
    with pytest.raises(SystemExit):
        main(["train", "tiny", *args, f"logging.output_dir={run}", "--resume", "latest"])
    (line,) = rglcd_lines(capsys.readouterr().err)
    assert "trainer_state.json is damaged (global_step, nan_streak or data is missing)" in line


def test_a_full_disk_while_sampling_is_one_line_and_leaves_no_truncated_image(made, capsys, monkeypatch, tmp_path):
    real_save = Image.Image.save

    def disk_fills_at_the_second_image(image, path, *args, **kwargs):
        if not list(tmp_path.glob("*.png")):
            return real_save(image, path, *args, **kwargs)
        Path(path).write_bytes(b"\x89PNG\r\n")  # what a full disk leaves: the file, cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_fills_at_the_second_image)
    with pytest.raises(SystemExit) as stopped:
        main(["sample", "--model", str(made.student), "--prompt", "a", "--num-images", "2", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    (line,) = rglcd_lines(capsys.readouterr().err)
    assert line == "rglcd sample: No space left on device (is the disk full?)"
    assert [path.name for path in tmp_path.iterdir()] == ["000-00.png"]  # the first image, whole
    assert Image.open(tmp_path / "000-00.png").size == (32, 32)


@pytest.mark.parametrize(
    "name, text",
    [
        ("captions.jsonl", '{"file": "0.png", "caption": "first"}\n{"file": "1.png", "caption": "second"}\n'),
        ("captions.csv", "file,caption\n0.png,first\n1.png,second\n"),
    ],
)
def test_a_captions_file_with_a_byte_order_mark_keeps_every_caption(tmp_path, name, text):
    """Windows editors start UTF-8 files with a byte-order mark: it lost the first caption (jsonl) or the header
    (csv)."""
    for index in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    samples = [sample for shard in open_source(tmp_path) for sample in shard.samples(lambda reason, details: None)]
    assert [(sample.caption, sample.problem) for sample in samples] == [("first", None), ("second", None)]
