"""The evaluation machinery: seeded resumable generation, streamed scorers, HPSv2's chunk arithmetic, FID."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rglcd.evaluate import (
    Contender,
    EvalError,
    Scorers,
    _measure,
    comparison_pairs,
    evaluate,
    generate,
    image_paths,
    load_contender,
    paired_row_differences,
    pipeline_kind,
    read_images,
    relative_to_teacher,
)
from rglcd.export import export_pipeline
from rglcd.fid import FeatureExtractor, FrechetDistance
from rglcd.grid import GAP, ROW_LABEL_WIDTH
from rglcd.models import build_student, load_teacher
from rglcd.report import comparison_grid, group_tables, markdown_table, write_report
from rglcd.rewards import build_reward
from rglcd.stats import Estimate, bootstrap_mean, chunk_statistics, group_statistics, paired_difference

CAPTIONS = ["a red picture", "a blue picture", "a green picture"]


@pytest.fixture(scope="module")
def contenders(teacher_dirs, tmp_path_factory):
    teacher = load_teacher(teacher_dirs["epsilon"])
    student = export_pipeline(tmp_path_factory.mktemp("lcm") / "student", build_student(teacher.unet), teacher)
    return [
        Contender("teacher", teacher_dirs["epsilon"], "teacher", (3,), 7.5),
        Contender("LCM", student, "lcm", (1, 2), 6.0),
    ]


def load_all(folder, count):
    return torch.cat([images for _, images in read_images(image_paths(folder, count), batch_size=2)])


def test_generation_is_seeded_per_prompt_and_resumes(contenders, tmp_path):
    lcm = contenders[1]
    parts = load_contender(lcm)
    assert generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2) > 0
    images = load_all(tmp_path / "a", 3)
    assert images.shape == (3, 3, 32, 32)
    generate(lcm, parts, CAPTIONS[1:2], 2, tmp_path / "b", seed=5, batch_size=1)
    assert torch.equal(load_all(tmp_path / "b", 1)[0], images[1])  # prompt 1 got seed 4 + 1 in a batch; alone 5 + 0
    (tmp_path / "a" / "00001.png").unlink()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.png")}
    assert generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2) > 0
    assert torch.equal(load_all(tmp_path / "a", 3), images)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.png") if p.name in written} == written
    assert generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2) is None  # nothing left to do
    assert not list((tmp_path / "a").glob("*.partial.png"))


class CountImages:
    def reset(self):
        self.count = 0

    def update(self, images, captions, records):
        self.count += len(images)

    def compute(self):
        return float(self.count)


BOOTSTRAP_PICKS = np.random.default_rng(0).integers(0, 3, (2000, 3))  # bootstrap_mean's draws for 3 prompts
BOUNDS = [0.025, 0.975]


def saved_pixels(folder, row) -> list[np.ndarray]:
    """A row's images as written, read back from its PNGs in prompt order: float64 RGB in [0, 1], [H, W, 3]."""
    paths = image_paths(folder / "images" / f"{row['model']}-{row['steps']}", len(CAPTIONS))
    return [np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path in paths]


def hasler_susstrunk(pixels: np.ndarray) -> float:
    """Colourfulness by its published formula in float64, written here: σ_rgyb + 0.3·μ_rgyb of rg = R − G and
    yb = (R + G)/2 − B, σ and μ the root-sum-squares of the two population stds and means."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    rg, yb = red - green, (red + green) / 2 - blue
    return math.sqrt(rg.var() + yb.var()) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)


def sample_std(values: np.ndarray) -> float:
    """The sample standard deviation, by its definition: √(Σ (x − x̄)² / (n − 1))."""
    return math.sqrt(sum((value - values.mean()) ** 2 for value in values) / (len(values) - 1))


def test_evaluate_rows_scores_groups_table_grid_and_plots(contenders, tmp_path):
    colorfulness = build_reward("colorfulness")
    scorers = Scorers(
        per_image={
            "brightness": lambda images, texts, records: images.mean(dim=(1, 2, 3)),
            "colorfulness": lambda images, texts, records: colorfulness(images, texts),
        },
        per_set={"count": CountImages()},
        benchmark_scales={"brightness": 100.0},
    )
    rows = evaluate(contenders, CAPTIONS, tmp_path, scorers, groups=["x", "y", "x"], batch_size=2)
    assert [(row["model"], row["steps"]) for row in rows] == [("teacher", 3), ("LCM", 1), ("LCM", 2)]
    brightness_of = {}
    for row in rows:
        # Every reported number recomputed from the saved images (not from scores.json, which the same call wrote).
        pixels = saved_pixels(tmp_path, row)
        brightness = 100 * np.array([image.mean() for image in pixels])  # on the benchmark scale
        colourful = np.array([hasler_susstrunk(image) for image in pixels])  # scale 1
        brightness_of[row["model"], row["steps"]] = brightness
        assert brightness.std() > 0.01 and colourful.std() > 1e-4  # distinct images: ddof 0 and 1 differ
        assert row["brightness"] == pytest.approx(brightness.mean(), rel=1e-6)
        assert row["colorfulness"] == pytest.approx(colourful.mean(), rel=1e-5)
        # the sample standard deviation (n − 1) over the prompts
        assert row["brightness_std"] == pytest.approx(sample_std(brightness), rel=1e-5)
        assert row["colorfulness_std"] == pytest.approx(sample_std(colourful), rel=1e-4)
        scores = json.loads((tmp_path / "images" / f"{row['model']}-{row['steps']}" / "scores.json").read_text())
        assert scores["brightness"] == pytest.approx(brightness / 100, rel=1e-6)  # unscaled, as scored
        assert row["count"] == 3.0 and row["ms_per_image"] > 0 and row["images_per_second"] > 0
        groups = row["groups"]["brightness"]
        assert list(groups) == ["x", "y", "average"]
        assert groups["x"]["mean"] == pytest.approx((brightness[0] + brightness[2]) / 2, rel=1e-6)
        # One chunk of prompts per group: no spread across chunks to report (None, and no ± in the table).
        assert groups["y"] == {"mean": pytest.approx(brightness[1], rel=1e-6), "std": None, "chunks": 1}
        assert groups["average"]["mean"] == pytest.approx(brightness.mean(), rel=1e-6)
        assert row["brightness_ci"] == [
            pytest.approx(value, rel=1e-6)
            for value in np.quantile([brightness[pick].mean() for pick in BOOTSTRAP_PICKS], BOUNDS)
        ]  # the percentile bootstrap by hand: the same resamplings of the 3 prompts
        assert row["brightness_ci"][0] <= row["brightness"] <= row["brightness_ci"][1]
    pairs = comparison_pairs(rows)  # one model at two step counts: only each LCM row against the teacher
    assert [(first["model"], first["steps"], second["model"]) for first, second in pairs] == [
        ("LCM", 1, "teacher"), ("LCM", 2, "teacher")
    ]  # fmt: skip
    (difference, _) = paired_row_differences(pairs, ["brightness"], {"brightness": 100.0})
    lcm_1_minus_teacher = brightness_of["LCM", 1] - brightness_of["teacher", 3]  # prompt by prompt, from the images
    # (the images were scored in float32: 1e-4 of the 0-100 scale, not a relative bound on a difference)
    assert difference["brightness"]["mean"] == pytest.approx(lcm_1_minus_teacher.mean(), abs=1e-4)
    assert [difference["brightness"]["low"], difference["brightness"]["high"]] == [
        pytest.approx(value, abs=1e-4)
        for value in np.quantile([lcm_1_minus_teacher[pick].mean() for pick in BOOTSTRAP_PICKS], BOUNDS)
    ]
    assert (difference["first"], difference["first_steps"], difference["second_steps"]) == ("LCM", 1, 3)
    table = markdown_table(rows, ["brightness", "ms_per_image"])
    assert table.splitlines()[0] == "| model | steps | brightness | ms_per_image |"
    low, high = rows[0]["brightness_ci"]
    assert f"| {rows[0]['brightness']:.3f} [{low:.3f}, {high:.3f}] |" in table.splitlines()[2]
    assert len(table.splitlines()) == 2 + len(rows)
    assert "**brightness** by group" in group_tables(rows)
    assert not [line for line in group_tables(rows).splitlines() if line.startswith("|") and "±" in line]
    grid = Image.open(comparison_grid(rows, CAPTIONS[:2], tmp_path / "grid.png"))  # 32-pixel images, shown 4× larger
    assert grid.width == ROW_LABEL_WIDTH + (128 + GAP) * len(rows) - GAP and grid.height > 128 * 2
    results = {"rows": rows, "undefined": float("nan"), "unbounded": [float("inf")], "paired_differences": [difference]}
    write_report(
        tmp_path, "test", rows, ["brightness", "count"], results, ["a note"], CAPTIONS, [("count", "brightness")]
    )
    for name in ("results.json", "report.md", "grid.png", "plot-brightness.png", "plot-brightness-vs-count.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "- a note" in (tmp_path / "report.md").read_text()
    assert "| LCM 1 | teacher 3 | " in (tmp_path / "report.md").read_text()  # the paired differences
    # Strict JSON: NaN and Infinity, which strict parsers refuse, are written as null.
    strict = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert strict["undefined"] is None and strict["unbounded"] == [None] and strict["rows"][0]["groups"]


def test_hpsv2_chunk_arithmetic_by_hand():
    # Two chunks of 80: means 39.5 and 119.5 -> mean 79.5, population std 40.
    assert chunk_statistics(list(range(160))) == (79.5, 40.0)
    # Chunk means 1, 3, 8 (a shorter last chunk counts as one): mean 4, std √(26/3).
    mean, std = chunk_statistics([1.0] * 80 + [3.0] * 80 + [8.0] * 40)
    assert mean == 4.0 and std == pytest.approx(math.sqrt(26 / 3))
    values = [0.2] * 80 + [0.3] * 80 + [0.25] * 160
    table = group_statistics(values, ["anime"] * 160 + ["photo"] * 160, scale=100)
    assert table["anime"] == {"mean": pytest.approx(25.0), "std": pytest.approx(5.0), "chunks": 2}
    assert table["photo"] == {"mean": pytest.approx(25.0), "std": pytest.approx(0.0), "chunks": 2}
    assert table["average"] == {"mean": pytest.approx(25.0), "std": None, "chunks": None}
    assert group_statistics([0.2] * 80, ["one"] * 80)["one"]["std"] is None  # a single chunk has no spread
    rows = [{"model": "m", "steps": 2, "groups": {"hps": table}}]
    assert "| m | 2 | 25.000 ± 5.000 | 25.000 ± 0.000 | 25.000 |" in group_tables(rows)
    with pytest.raises(ValueError, match="no scores"):
        chunk_statistics([])


def test_bootstrap_mean_and_the_paired_difference():
    assert bootstrap_mean([2.0, 2.0, 2.0]) == Estimate(2.0, 2.0, 2.0, 3)
    with pytest.raises(ValueError, match="at least 2 values"):
        bootstrap_mean([1.0])
    constant = paired_difference([1.0, 2.0, 3.0], [0.75, 1.75, 2.75])
    assert (constant.mean, constant.low, constant.high, constant.count) == (0.25, 0.25, 0.25, 3)
    # Differences 0 and 1: a resampled mean is 0, ½ or 1 (¼, ½, ¼), so the 95 % interval spans [0, 1].
    two = paired_difference([1.0, 1.0], [1.0, 0.0])
    assert (two.mean, two.low, two.high) == (0.5, 0.0, 1.0) and str(two) == "+0.500 [+0.000, +1.000]"
    # Many items: the normal approximation mean ± 1.96·s/√n.
    differences = np.random.default_rng(1).normal(0.3, 1.0, 2500)
    wide = paired_difference(differences, np.zeros(2500))
    half_width = 1.96 * differences.std(ddof=1) / 50
    assert wide.low == pytest.approx(wide.mean - half_width, abs=0.005)
    assert wide.high == pytest.approx(wide.mean + half_width, abs=0.005)
    assert paired_difference(differences, np.zeros(2500)) == wide  # seeded: the same interval every time
    with pytest.raises(ValueError, match="paired sequences"):
        paired_difference([1.0], [1.0, 2.0])


def test_frechet_distance_through_torchmetrics_matches_the_closed_form():
    """One feature (mean brightness): FD = (μ1 − μ2)² + σ1² + σ2² − 2·σ1·σ2, with unbiased variances."""
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 8, 8, generator=generator)
    fake = (torch.rand(30, 3, 8, 8, generator=generator) * 0.5 + 0.3).clamp(0, 1)
    extractor = FeatureExtractor(lambda images: images.mean(dim=(1, 2, 3))[:, None].double(), num_features=1)
    fid = FrechetDistance(extractor, iter([real[:25], real[25:]]))
    fid.reset()
    for batch in (fake[:16], fake[16:]):
        fid.update(batch, [], [])
    a, b = real.mean(dim=(1, 2, 3)).double(), fake.mean(dim=(1, 2, 3)).double()
    expected = (a.mean() - b.mean()) ** 2 + a.var() + b.var() - 2 * (a.var() * b.var()).sqrt()
    assert fid.compute() == pytest.approx(expected.item(), rel=1e-6)
    fid.reset()  # the references stay: the same set again gives the same distance
    fid.update(fake, [], [])
    assert fid.compute() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(EvalError, match="at least 2 reference images"):
        FrechetDistance(extractor, iter([real[:1]]))


def fd_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FrechetDistance on given [N, D] features, passed through as [N, D, 1, 1] "images"."""
    extractor = FeatureExtractor(lambda images: images.flatten(1), num_features=real.shape[1])
    fid = FrechetDistance(extractor, iter([real[:, :, None, None]]))
    fid.update(fake[:, :, None, None], [], [])
    return fid.compute()


def separated(mean: list[float], spread: list[float]) -> torch.Tensor:
    """Points mean ± spread_i·e_i: sample mean ``mean``, unbiased covariance diag(2·spread²/(2D − 1))."""
    mean_t, spread_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(spread, dtype=torch.float64)
    return torch.cat([mean_t + torch.diag(spread_t), mean_t - torch.diag(spread_t)])


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_matches_the_closed_form_in_three_dimensions(rotate):
    mean1, spread1, mean2, spread2 = [0.0, 1.0, -2.0], [1.0, 2.0, 0.5], [0.5, 1.0, 1.0], [3.0, 0.2, 0.5]
    real, fake = separated(mean1, spread1), separated(mean2, spread2)
    if rotate:  # FD is invariant under a common rotation, which makes both covariances non-diagonal
        rotation, _ = torch.linalg.qr(
            torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        )
        real, fake = real @ rotation, fake @ rotation
    var1, var2 = ([2 * s**2 / 5 for s in spread] for spread in (spread1, spread2))
    expected = sum((a - b) ** 2 for a, b in zip(mean1, mean2, strict=True)) + sum(
        v1 + v2 - 2 * math.sqrt(v1 * v2) for v1, v2 in zip(var1, var2, strict=True)
    )
    assert fd_of_features(real, fake) == pytest.approx(expected, rel=1e-6)
    assert fd_of_features(fake, real) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_with_non_commuting_covariances():
    # In 2-D, tr (Σ₁Σ₂)^½ = sqrt(tr Σ₁Σ₂ + 2 sqrt(det Σ₁ det Σ₂)).
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(50, 2, dtype=torch.float64, generator=generator) @ torch.tensor(
        [[2.0, 0.0], [1.5, 0.5]], dtype=torch.float64
    )
    fake = (
        torch.randn(60, 2, dtype=torch.float64, generator=generator)
        @ torch.tensor([[0.3, -1.0], [0.0, 1.0]], dtype=torch.float64)
        + 1
    )
    cov_real, cov_fake = torch.cov(real.T), torch.cov(fake.T)
    assert not torch.allclose(cov_real @ cov_fake, cov_fake @ cov_real)
    cross = torch.sqrt((cov_real @ cov_fake).trace() + 2 * torch.sqrt(cov_real.det() * cov_fake.det()))
    expected = (real.mean(0) - fake.mean(0)).square().sum() + cov_real.trace() + cov_fake.trace() - 2 * cross
    assert fd_of_features(real, fake) == pytest.approx(expected.item(), rel=1e-6)


def test_models_of_different_training_seeds_are_compared_only_with_the_teacher():
    rows = [{"model": "teacher", "kind": "teacher", "steps": 4}] + [
        {"model": f"{family} {seed}", "kind": "lcm", "steps": 2} for seed in (0, 1) for family in ("LCM", "RG-LCM")
    ]
    seeds = {"LCM 0": 0, "RG-LCM 0": 0, "LCM 1": 1, "RG-LCM 1": 1}
    pairs = [(first["model"], second["model"]) for first, second in comparison_pairs(rows, seeds)]
    assert pairs == [("LCM 0", "RG-LCM 0"), ("LCM 1", "RG-LCM 1")] + [(row["model"], "teacher") for row in rows[1:]]
    assert len(comparison_pairs(rows)) == 6 + 4  # without seeds: every two students at 2 steps, and each vs the teacher


def test_relative_to_teacher_uses_the_teacher_with_most_steps():
    rows = [
        {"model": "t", "kind": "teacher", "steps": 25, "hf": 0.4},
        {"model": "t", "kind": "teacher", "steps": 50, "hf": 0.2},
        {"model": "s", "kind": "lcm", "steps": 2, "hf": 0.3},
    ]
    relative_to_teacher(rows, "hf", "hf_ratio")
    assert [row["hf_ratio"] for row in rows] == [pytest.approx(2.0), 1.0, pytest.approx(1.5)]


def test_pipeline_kind_reads_the_scheduler(contenders, tmp_path):
    assert pipeline_kind(contenders[0].path) == "teacher" and pipeline_kind(contenders[1].path) == "lcm"
    with pytest.raises(EvalError, match=r"no model_index\.json"):
        pipeline_kind(tmp_path)


def test_timings_wait_for_the_device_after_a_warm_up_batch(contenders, tmp_path, monkeypatch):
    """The clock is read only with the device's queue drained (CUDA returns before its kernels finish), and the first
    batch, which pays for compilation and the allocator, is run once untimed."""
    import rglcd.evaluate as module

    events, ticks = [], iter(range(100))
    sample = module._sample
    monkeypatch.setattr(module, "synchronize", lambda device: events.append(f"sync {device}"))
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or next(ticks)))
    monkeypatch.setattr(module, "_sample", lambda *args: events.append(f"sample {len(args[2])}") or sample(*args))
    lcm = contenders[1]
    ms = generate(lcm, load_contender(lcm, device="cpu"), CAPTIONS, 1, tmp_path, batch_size=2)
    assert events == [
        "sample 2",  # the warm-up: the first batch, untimed
        "sync cpu", "clock", "sample 2", "sync cpu", "clock",
        "sync cpu", "clock", "sample 1", "sync cpu", "clock",
    ]  # fmt: skip
    assert ms == pytest.approx(1000 * 2 / 3)  # two batches of one tick each, over three images


def write_pictures(folder, count):
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(folder / f"{index:05d}.png")
    return image_paths(folder, count)


class RecordDevice:
    """A set scorer that records the device of the images it reads."""

    def __init__(self):
        self.devices = []

    def reset(self):
        pass

    def update(self, images, captions, records):
        self.devices.append(images.device)

    def compute(self):
        return 0.0


def test_the_scorers_read_every_image_batch_on_the_eval_device(tmp_path):
    seen, per_set = [], RecordDevice()
    scorers = Scorers(
        per_image={"where": lambda images, texts, records: seen.append(images.device) or torch.zeros(len(images))},
        per_set={"where-set": per_set},
        benchmark_scales={},
    )
    values = _measure(write_pictures(tmp_path / "images", 3), CAPTIONS, CAPTIONS, scorers, 2, torch.device("meta"))
    assert seen == per_set.devices == [torch.device("meta")] * 2 and values["where"] == [0.0] * 3


def test_frechet_distance_holds_its_model_and_reads_its_references_on_its_device():
    seen = []
    extractor = FeatureExtractor(lambda images: seen.append(images.device) or images.mean(dim=(1, 2, 3))[:, None], 1)
    fid = FrechetDistance(extractor, iter([torch.rand(4, 3, 8, 8)]), device="meta")
    fid.update(torch.rand(2, 3, 8, 8, device="meta"), [], [])
    assert seen == [torch.device("meta")] * 2 and fid.fid.real_features_sum.device == torch.device("meta")
