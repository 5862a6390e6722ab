"""`rglcd eval` on tiny models: the report files, resume, and errors before any generation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rglcd.eval_command import METRICS, EvalRun, EvalSettings, Replicate, register_metric, run_eval
from rglcd.evaluate import EvalError
from rglcd.export import export_pipeline
from rglcd.models import build_student, load_teacher
from rglcd.rewards import register_reward
from rglcd.rewards.base import RewardModel

from .test_cli import run_main
from .test_evaluate import hasler_susstrunk, sample_std


@pytest.fixture(scope="module")
def models(teacher_dirs, tmp_path_factory):
    teacher = load_teacher(teacher_dirs["epsilon"])
    student = export_pipeline(tmp_path_factory.mktemp("lcm") / "student", build_student(teacher.unet), teacher)
    return teacher_dirs["epsilon"], student


def rglcd_eval(*args, cache, expect=0):
    """``rglcd eval ARGS`` in this process, with ``RGLCD_CACHE=cache`` (the README test runs it in a new one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RGLCD_CACHE", str(cache))
        result = run_main("eval", *args, check=False)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def test_world_evaluation_writes_the_report_and_resumes(models, tmp_path):
    teacher, student = models
    out = tmp_path / "eval"
    args = ["--model", f"teacher={teacher}", "--model", f"lcm={student}", "--prompts", "world:6", "--steps", "1,2",
            "--teacher-steps", "2", "--batch-size", "4", "--out", out]  # fmt: skip
    rglcd_eval(*args, cache=tmp_path / "cache")
    results = json.loads((out / "results.json").read_text())
    assert [(row["model"], row["steps"]) for row in results["rows"]] == [("teacher", 2), ("lcm", 1), ("lcm", 2)]
    assert results["prompts"] == {"spec": "world:6", "count": 6, "groups": ["one shape", "two shapes"]}
    for row in results["rows"]:
        assert -1 <= row["world-clip"] <= 1 and 0 <= row["judge_accuracy"] <= 1 and row["fid"] >= 0
        assert row["ms_per_image"] > 0 and list(row["groups"]["world-clip"]) == ["one shape", "two shapes", "average"]
    assert results["rows"][0]["hf_ratio"] == 1.0  # the teacher is the reference
    assert not (student / "README.md").exists()  # a folder without an rglcd model card gets none
    pairs = [(d["first"], d["first_steps"], d["second"], d["second_steps"]) for d in results["paired_differences"]]
    assert pairs == [("teacher", 2, "lcm", 2), ("lcm", 1, "teacher", 2), ("lcm", 2, "teacher", 2)]
    for difference in results["paired_differences"]:
        assert difference["world-clip"]["low"] <= difference["world-clip"]["mean"] <= difference["world-clip"]["high"]
        assert difference["judge_accuracy"]["count"] == 6 and "fid" not in difference  # per-image metrics only
    for row in results["rows"]:
        low, high = row["world-clip_ci"]
        assert low <= row["world-clip"] <= high
    report = (out / "report.md").read_text()
    columns = (
        "world-clip | judge_accuracy | judge_exact | high_frequency | fid | hf_ratio | ms_per_image | images_per_second"
    )
    assert f"| model | steps | {columns} |" in report and "**world-clip** by group" in report
    for name in ("grid.png", "plot-world-clip.png", "plot-fid.png", "plot-world-clip-vs-fid.png"):
        assert (out / name).stat().st_size > 0, name

    # Resume: nothing is generated again; a deleted image is the only one made anew, the same as before.
    image = out / "images" / "lcm-2" / "00003.png"
    kept = out / "images" / "lcm-2" / "00000.png"
    before, kept_time = image.read_bytes(), kept.stat().st_mtime_ns
    image.unlink()
    rglcd_eval(*args, cache=tmp_path / "cache")
    assert image.read_bytes() == before and kept.stat().st_mtime_ns == kept_time
    again = json.loads((out / "results.json").read_text())
    assert [row["world-clip"] for row in again["rows"]] == [row["world-clip"] for row in results["rows"]]


def test_the_judge_per_attribute_over_the_prompts_it_applies_to(models, tmp_path):
    student = models[1]
    out = tmp_path / "eval"
    rglcd_eval("--model", f"lcm={student}", "--prompts", "world:12", "--steps", "1", "--metrics", "judge-attributes",
               "--batch-size", "4", "--out", out, cache=tmp_path / "cache")  # fmt: skip
    text = (out / "results.json").read_text()
    assert "NaN" not in text  # strict JSON: a prompt without the attribute is null in scores.json
    (row,) = json.loads(text)["rows"]
    scores = json.loads((out / "images" / "lcm-1" / "scores.json").read_text())
    for name in ("judge_colour", "judge_shape", "judge_size", "judge_position", "judge_left", "judge_right"):
        applicable = [value for value in scores[name] if value is not None]
        assert 0 < len(applicable) < 12  # one-shape attributes on one-shape prompts only, sides on two-shape ones
        assert row[name] == pytest.approx(sum(applicable) / len(applicable))


def test_a_text_prompt_file_with_a_pixel_metric(models, tmp_path):
    student = models[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n# a comment\na blue circle\n")
    out = tmp_path / "eval"
    rglcd_eval("--model", student, "--prompts", prompts, "--steps", "1", "--metrics", "colorfulness",
               "--channels-last", "--allow-tf32", "--out", out, cache=tmp_path / "cache")  # fmt: skip
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["model"] == "student" and "groups" not in row
    assert sorted(p.name for p in (out / "images" / "student-1").glob("*.png")) == ["00000.png", "00001.png"]
    # The reported colourfulness, recomputed from the two images written (the formula in float64, written in
    # test_evaluate): their mean and sample standard deviation.
    pixels = [
        np.asarray(Image.open(out / "images" / "student-1" / f"0000{i}.png"), dtype=np.float64) / 255 for i in (0, 1)
    ]
    colourful = np.array([hasler_susstrunk(image) for image in pixels])
    assert row["colorfulness"] == pytest.approx(colourful.mean(), rel=1e-5)
    assert row["colorfulness_std"] == pytest.approx(sample_std(colourful), rel=1e-3)
    # Other prompts into the same folder: the images are not reused for them, and nothing is generated.
    prompts.write_text("a green triangle\na blue circle\n")
    result = rglcd_eval("--model", student, "--prompts", prompts, "--steps", "1", "--metrics", "colorfulness",
                        "--out", out, cache=tmp_path / "cache", expect=2)  # fmt: skip
    assert "holds images made with another prompts_sha256" in result.stderr


def test_an_lcm_and_tcd_gamma_sweep(models, tmp_path):
    student = models[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "eval"
    rglcd_eval("--model", f"s={student}", "--prompts", prompts, "--steps", "1,2", "--metrics", "colorfulness",
               "--scheduler", "lcm,tcd", "--eta", "0,1", "--out", out, cache=tmp_path / "cache")  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["model"], row["steps"], row["sampler"], row["eta"]) for row in rows] == [
        (label, steps, sampler, eta)
        for label, sampler, eta in (
            ("s (lcm)", "lcm", None),
            ("s (tcd eta=0)", "tcd", 0.0),
            ("s (tcd eta=1)", "tcd", 1.0),
        )
        for steps in (1, 2)
    ]
    manifest = json.loads((out / "images" / "s (tcd eta=1)-2" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["eta"]) == ("tcd", 1.0)
    pictures = {row["model"]: (out / "images" / f"{row['model']}-2" / "00000.png").read_bytes() for row in rows}
    assert len(set(pictures.values())) == 3  # each sampler and γ makes its own 2-step images
    result = rglcd_eval("--model", student, "--prompts", prompts, "--eta", "0.5", "--out", out,
                        cache=tmp_path / "cache", expect=2)  # fmt: skip
    assert "--eta is TCD's gamma: use it with --scheduler tcd" in result.stderr


def test_a_metric_declared_relative_to_the_teacher_gets_its_column(models, tmp_path, monkeypatch):
    """run_eval reads the registry's declaration (as hf_ratio's): the measure over the teacher's, in its own column."""
    monkeypatch.setattr(METRICS, "_entries", dict(METRICS._entries))  # registered into a copy, dropped after the test

    @register_metric("brightness_ratio", "mean pixel over the teacher's", relative_to_teacher="brightness")
    def _brightness(scorers, request):
        scorers.per_image["brightness"] = lambda images, texts, records: images.mean(dim=(1, 2, 3))

    teacher, student = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    settings = EvalSettings(
        models=[f"teacher={teacher}", f"lcm={student}"], out=tmp_path / "eval", prompts=str(prompts), steps=(1,),
        teacher_steps=(2,), metrics=["brightness_ratio"],
    )  # fmt: skip
    teacher_row, lcm_row = run_eval(settings)["rows"]
    assert teacher_row["brightness_ratio"] == 1.0
    assert lcm_row["brightness_ratio"] == pytest.approx(lcm_row["brightness"] / teacher_row["brightness"])
    assert "| brightness | brightness_ratio | ms_per_image |" in (tmp_path / "eval" / "report.md").read_text()


def test_replicates_across_training_seeds(models, tmp_path):
    """An EvalRun's replicates: compared only within their seed (and with the teacher), summarised across seeds,
    and the grid keeps the first seed's."""
    from PIL import Image

    from rglcd.grid import GAP, ROW_LABEL_WIDTH

    teacher, student = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")
    replicates = {f"{family} seed {seed}": Replicate(family, seed) for seed in (0, 1) for family in ("LCM", "RG-LCM")}
    settings = EvalSettings(models=[f"teacher={teacher}", *(f"{label}={student}" for label in replicates)],
                            out=tmp_path / "eval", prompts=str(prompts), steps=(1,), teacher_steps=(2,),
                            metrics=["colorfulness"])  # fmt: skip
    results = run_eval(settings, EvalRun(title="seeds", replicates=replicates, contrast=("RG-LCM", "LCM")))
    summary = results["across_seeds"]
    assert summary["seeds"] == [0, 1] and [s["model"] for s in summary["students"]] == ["LCM", "RG-LCM"]
    (effect,) = summary["rg_lcm_minus_lcm"]  # the same weights and noise: no difference in any seed
    assert effect["colorfulness"]["mean"] == 0.0 and effect["colorfulness"]["n"] == 2
    for record in results["paired_differences"]:
        assert record["second"] == "teacher" or record["first"][-1] == record["second"][-1]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.startswith("# seeds") and "**RG-LCM − LCM, seed by seed**" in report
    grid = Image.open(tmp_path / "eval" / "grid.png")  # the teacher and the first seed's two students
    assert grid.width == ROW_LABEL_WIDTH + 3 * (128 + GAP) - GAP


@pytest.mark.parametrize(
    "change,message",
    [
        (["--metrics", "hpsv9"], "unknown metric(s) hpsv9; choose from"),
        (["--prompts", "missing.txt"], "prompt set"),
        (["--metrics", "judge", "--prompts", "PROMPTS"], "the judge metric needs the world prompts"),
        (["--metrics", "fid", "--prompts", "PROMPTS"], "fid needs reference images"),
        (["--model", "NOT_A_PIPELINE"], "no model_index.json"),
    ],
)
def test_bad_input_fails_before_generating(models, tmp_path, monkeypatch, change, message):
    teacher, _ = models
    monkeypatch.setenv("RGLCD_CACHE", str(tmp_path))
    (tmp_path / "prompts.txt").write_text("a red square\n")
    (tmp_path / "empty").mkdir()
    change = [str(tmp_path / "prompts.txt") if c == "PROMPTS" else str(tmp_path / "empty") if c == "NOT_A_PIPELINE"
              else c for c in change]  # fmt: skip
    out = tmp_path / "eval"
    result = run_main("eval", "--model", teacher, "--prompts", "world:2", *change, "--out", out, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert not (out / "images").exists()


def test_coco_fid_names_the_inception_weights_it_needs(models, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("RGLCD_CACHE", str(tmp_path))
    images = tmp_path / "val2014"
    images.mkdir()
    for index in (1, 2):
        Image.new("RGB", (40, 30), (index * 60, 0, 0)).save(images / f"COCO_val2014_{index:012d}.jpg")
    captions = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2)],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"a picture number {i}"} for i in (1, 2)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    spec = f"coco:{tmp_path / 'captions.json'}:{images}"
    result = run_main("eval", "--model", models[0], "--prompts", spec, "--metrics", "fid", "--out", tmp_path / "eval",
                      check=False)  # fmt: skip
    assert result.returncode == 2
    assert "--inception-weights weights-inception-2015-12-05-6726825d.pth" in result.stderr
    (images / "COCO_val2014_000000000002.jpg").unlink()
    result = run_main("eval", "--model", models[0], "--prompts", spec, "--metrics", "fid", "--out", tmp_path / "eval",
                      check=False)  # fmt: skip
    assert result.returncode == 2
    assert "1 reference images are missing" in result.stderr


def test_a_retrained_model_at_the_same_path_is_evaluated_again(models, tmp_path):
    """The image manifest records the weights' fingerprint: new weights at the model's path make new images (and
    scores), not the old ones reused."""
    teacher = load_teacher(models[0])
    student = export_pipeline(tmp_path / "student", build_student(teacher.unet), teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = ["--model", student, "--prompts", prompts, "--steps", "1", "--metrics", "colorfulness", "--out"]
    first = rglcd_eval(*args, tmp_path / "eval", cache=tmp_path / "cache")
    image = tmp_path / "eval" / "images" / "student-1" / "00000.png"
    before, made = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"], image.read_bytes()
    retrained = build_student(teacher.unet)
    with torch.no_grad():
        retrained.conv_out.bias.add_(0.5)  # other weights, same path
    export_pipeline(student, retrained, teacher)
    again = rglcd_eval(*args, tmp_path / "eval", cache=tmp_path / "cache")
    assert "changed since" in again.stdout and "changed since" not in first.stdout
    assert image.read_bytes() != made
    after = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert after[0]["colorfulness"] != before[0]["colorfulness"]


SEEN_ON = []  # (the reward's weights' device, its images' device) per call


@register_reward("test-device-recorder")
class DeviceRecorder(RewardModel):
    """Scores 0 and records where its weights and the images it reads are."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, images, prompts):
        SEEN_ON.append((self.weight.device, images.device))
        return torch.zeros(len(images))


def test_dtype_is_recorded_and_the_metrics_follow_the_eval_device(models, tmp_path):
    """bf16 on the CPU is written to the manifest and results.json (images of another dtype are never reused); the
    rewards and the images they read go to the eval's device (the meta device, which a CPU has)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    common = dict(models=[f"lcm={models[1]}"], prompts=str(prompts), steps=(1,), metrics=["test-device-recorder"],
                  out=tmp_path / "eval")  # fmt: skip
    results = run_eval(EvalSettings(**common, device="cpu", dtype="bf16"))
    assert (results["settings"]["device"], results["settings"]["dtype"]) == ("cpu", "bfloat16")
    manifest = json.loads((tmp_path / "eval" / "images" / "lcm-1" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert SEEN_ON == [(torch.device("cpu"), torch.device("cpu"))]
    with pytest.raises(EvalError, match="holds images made with another dtype"):
        run_eval(EvalSettings(**common, device="cpu"))  # fp32, the CPU's default
    SEEN_ON.clear()
    results = run_eval(EvalSettings(**common, device="meta", dtype="bf16"))  # the images are reused: only scored
    assert SEEN_ON == [(torch.device("meta"), torch.device("meta"))]
    assert results["settings"]["device"] == "meta"


def test_cuda_without_a_gpu_and_an_unknown_dtype_are_one_line_errors(models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_main("eval", "--model", models[1], "--device", "cuda", "--out", tmp_path / "eval", check=False)
    assert result.returncode == 2
    assert result.stderr == "rglcd eval: --device cuda: torch sees no CUDA GPU here; use cpu (or auto)\n"
    result = run_main("eval", "--model", models[1], "--dtype", "fp8", "--out", tmp_path / "eval", check=False)
    assert result.returncode == 2 and "argument --dtype: invalid choice: 'fp8'" in result.stderr
    assert not (tmp_path / "eval").exists()
