"""rglcd.stats against independent computations: the percentile bootstrap written out here (the same generator's
draws, plain sums and a hand-written linear-interpolation percentile), paired differences prompt by prompt, and
spreads across training seeds by their definitions."""

import math

import numpy as np
import pytest

from rglcd.stats import (
    Estimate,
    bootstrap_mean,
    contrast_effects,
    family_spreads,
    group_statistics,
    paired_difference,
    paired_differences,
    spread,
)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (position q·(n − 1))."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def bootstrap_by_hand(values, level=0.95, resamples=2000, seed=0) -> tuple[float, float, float]:
    """(mean, low, high): resample the items with replacement ``resamples`` times, with the draws of
    ``numpy.random.default_rng(seed).integers(0, n, (resamples, n))`` (one row per resampling), and take the
    (1 ∓ level)/2 percentiles of the resampled means."""
    values = [float(value) for value in values]
    n = len(values)
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    means = [sum(values[int(index)] for index in row) / n for row in draws]
    return sum(values) / n, percentile(means, (1 - level) / 2), percentile(means, (1 + level) / 2)


VALUES = [1.0, 4.0, 2.0, 8.0, 5.0, 3.5, 0.5]


@pytest.mark.parametrize(
    "level, resamples, seed", [(0.95, 2000, 0), (0.9, 500, 7), (0.5, 301, 123)], ids=["defaults", "90%", "50%"]
)
def test_bootstrap_mean_is_the_percentile_bootstrap_of_its_seeded_draws(level, resamples, seed):
    """The interval is the (1 ∓ level)/2 percentiles of the means of ``resamples`` resamplings drawn from ``seed``:
    a swapped bound, a transposed draw, an ignored seed, level or count changes these numbers."""
    mean, low, high = bootstrap_by_hand(VALUES, level, resamples, seed)
    estimate = bootstrap_mean(VALUES, level=level, resamples=resamples, seed=seed)
    assert estimate.mean == pytest.approx(24.0 / 7, rel=1e-12) == pytest.approx(mean, rel=1e-12)
    assert (estimate.low, estimate.high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert estimate.count == 7 and estimate.low < estimate.mean < estimate.high
    other_seed = bootstrap_mean(VALUES, level=level, resamples=resamples, seed=seed + 1)
    assert (other_seed.low, other_seed.high) != (estimate.low, estimate.high)


def test_a_wider_level_gives_a_wider_interval_around_the_same_mean():
    narrow, wide = bootstrap_mean(VALUES, level=0.5), bootstrap_mean(VALUES, level=0.99)
    assert wide.low < narrow.low < narrow.mean == wide.mean < narrow.high < wide.high


def test_paired_difference_is_the_bootstrap_of_the_item_by_item_differences():
    """first − second prompt by prompt (not the difference of two independent bootstraps), with level, resamples
    and seed passed on; the reversed pair mirrors it."""
    first = [0.30, 0.52, 0.41, 0.77, 0.25, 0.60]
    second = [0.20, 0.55, 0.31, 0.50, 0.30, 0.40]
    differences = [a - b for a, b in zip(first, second, strict=True)]  # 0.1, -0.03, 0.1, 0.27, -0.05, 0.2
    mean, low, high = bootstrap_by_hand(differences, 0.8, 999, 5)
    estimate = paired_difference(first, second, level=0.8, resamples=999, seed=5)
    assert estimate.mean == pytest.approx(0.59 / 6, rel=1e-9) == pytest.approx(mean, rel=1e-9)
    assert (estimate.low, estimate.high, estimate.count) == (pytest.approx(low), pytest.approx(high), 6)
    reverse = paired_difference(second, first, level=0.8, resamples=999, seed=5)
    assert (reverse.mean, reverse.low, reverse.high) == (
        pytest.approx(-estimate.mean),
        pytest.approx(-estimate.high),
        pytest.approx(-estimate.low),
    )  # the same draws of negated values: the interval mirrored


def test_paired_differences_scale_each_metric_and_drop_the_prompts_it_does_not_apply_to():
    """Per metric: the items where both models have a value (NaN: not applicable), times the metric's benchmark
    scale, through paired_difference's defaults; None when fewer than two items remain."""
    nan = float("nan")
    first = {"hps": [0.30, 0.28, nan, 0.26, 0.31], "count": [1.0, nan, nan, 0.0, nan], "judge": [1.0, 0.0, 1.0, 1, 0]}
    second = {"hps": [0.27, nan, 0.25, 0.25, 0.27], "count": [0.0, 1.0, nan, 0.0, nan], "judge": [0.0, 0, 1, 0, 1]}
    result = paired_differences(first, second, ["hps", "count", "judge"], scales={"hps": 100.0})
    hps = [100 * (a - b) for a, b in ((0.30, 0.27), (0.26, 0.25), (0.31, 0.27))]  # prompts 0, 3 and 4
    mean, low, high = bootstrap_by_hand(hps)
    assert result["hps"] == {
        "mean": pytest.approx(mean),
        "low": pytest.approx(low),
        "high": pytest.approx(high),
        "count": 3,
    }
    assert mean == pytest.approx(8 / 3)
    assert result["count"] == {"mean": 0.5, "low": 0.0, "high": 1.0, "count": 2}  # prompts 0 and 3: 1 − 0, 0 − 0
    mean, low, high = bootstrap_by_hand([1.0, 0.0, 0.0, 1.0, -1.0])  # scale 1 without an entry
    assert result["judge"] == {
        "mean": pytest.approx(0.2),
        "low": pytest.approx(low),
        "high": pytest.approx(high),
        "count": 5,
    }
    only_one = paired_differences({"x": [1.0, nan]}, {"x": [0.0, 2.0]}, ["x"])
    assert only_one == {"x": None}


def test_group_statistics_skip_the_prompts_a_metric_does_not_apply_to():
    """NaN values (the metric does not apply) leave their group's chunks and the average; a group with none left
    reports no mean."""
    nan = float("nan")
    values = [0.1, nan, 0.3, nan, nan, 0.6]
    table = group_statistics(values, ["a", "b", "a", "b", "c", "c"], scale=10.0, chunk=1)
    # a: chunks of one prompt each, 1 and 3: mean 2, population std 1; c: one chunk of 6, no spread.
    assert table["a"] == {"mean": pytest.approx(2.0), "std": pytest.approx(1.0), "chunks": 2}
    assert table["b"] == {"mean": None, "std": None, "chunks": 0}
    assert table["c"] == {"mean": pytest.approx(6.0), "std": None, "chunks": 1}
    assert table["average"] == {"mean": pytest.approx(10 / 3), "std": None, "chunks": None}  # (1 + 3 + 6) / 3


def test_spread_is_the_sample_standard_deviation_across_seeds():
    """Mean 5, squared deviations summing to 32 over 8 seeds: sample sd √(32/7) (the population's would be 2)."""
    figures = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    assert spread(figures) == {"mean": 5.0, "sd": pytest.approx(math.sqrt(32 / 7)), "min": 2.0, "max": 9.0, "n": 8}
    assert spread([0.25]) == {"mean": 0.25, "sd": None, "min": 0.25, "max": 0.25, "n": 1}


def test_family_spreads_group_rows_by_family_and_steps():
    """Each (family, steps) over its seeds' rows, each column on its own; rows of no family (the teacher) left out."""
    family_of = {f"{family} s{seed}": family for family in ("LCM", "RG") for seed in range(3)}
    rows = [{"model": "teacher", "steps": 50, "r": 9.0, "q": 9.0}]
    values = {("LCM", 1): [1.0, 2.0, 6.0], ("LCM", 4): [3.0, 3.0, 3.0], ("RG", 1): [2.0, 4.0, 9.0]}
    for (family, steps), figures in values.items():
        for seed, figure in enumerate(figures):
            rows.append({"model": f"{family} s{seed}", "steps": steps, "r": figure, "q": -2 * figure})
    spreads = family_spreads(rows, family_of, ["r", "q"])
    assert [(entry["model"], entry["steps"]) for entry in spreads] == list(values)
    lcm_1, lcm_4, rg_1 = spreads
    assert lcm_1["r"] == {"mean": 3.0, "sd": pytest.approx(math.sqrt(7)), "min": 1.0, "max": 6.0, "n": 3}
    assert lcm_1["q"] == {"mean": -6.0, "sd": pytest.approx(2 * math.sqrt(7)), "min": -12.0, "max": -2.0, "n": 3}
    assert lcm_4["r"]["sd"] == 0.0
    assert rg_1["r"] == {"mean": 5.0, "sd": pytest.approx(math.sqrt(13)), "min": 2.0, "max": 9.0, "n": 3}  # 26/2


def test_contrast_effects_orient_each_seeds_difference_and_count_its_interval():
    """RG − LCM per steps and seed: records written LCM − RG are negated (and their bounds swapped); the spread is
    over the seeds' means; a seed counts above (below) zero when its whole interval is."""
    family_of = {"LCM 0": "LCM", "RG 0": "RG", "LCM 1": "LCM", "RG 1": "RG", "LCM 2": "LCM", "RG 2": "RG"}

    def record(first, second, steps, mean, low, high):
        return {"first": first, "first_steps": steps, "second": second, "second_steps": steps,
                "r": {"mean": mean, "low": low, "high": high}}  # fmt: skip

    paired = [
        record("RG 0", "LCM 0", 2, 0.5, 0.2, 0.8),  # RG − LCM: [0.2, 0.8], above zero
        record("LCM 1", "RG 1", 2, -1.5, -2.0, -1.0),  # LCM − RG: RG − LCM is 1.5 in [1.0, 2.0], above zero
        record("LCM 2", "RG 2", 2, 0.4, 0.1, 0.7),  # RG − LCM is −0.4 in [−0.7, −0.1], below zero
        record("RG 0", "LCM 0", 4, 0.1, -0.2, 0.4),  # spans zero
        record("RG 1", "LCM 1", 4, 0.3, 0.0, 0.6),  # touches zero from above: not above it
        record("LCM 2", "RG 2", 4, 0.3, 0.0, 0.6),  # RG − LCM in [−0.6, 0]: touches zero from below, not below it
        record("LCM 0", "teacher", 2, 5.0, 4.0, 6.0),  # not the contrast
    ]
    two, four = contrast_effects(paired, family_of, ("RG", "LCM"), ["r"])
    assert two["steps"] == 2 and four["steps"] == 4
    # 0.5, 1.5, −0.4: mean 1.6/3, squared deviations from it sum to 1.806 − 1.6²/3
    assert two["r"]["mean"] == pytest.approx(1.6 / 3)
    assert two["r"]["sd"] == pytest.approx(math.sqrt((0.25 + 2.25 + 0.16 - 1.6**2 / 3) / 2))
    assert (two["r"]["min"], two["r"]["max"], two["r"]["n"]) == (pytest.approx(-0.4), 1.5, 3)
    assert (two["r"]["above_zero"], two["r"]["below_zero"]) == (2, 1)
    assert (four["r"]["mean"], four["r"]["n"]) == (pytest.approx(0.1 / 3), 3)
    assert (four["r"]["above_zero"], four["r"]["below_zero"]) == (0, 0)  # strictly: an interval ending at 0 is neither


def test_an_estimate_prints_its_mean_and_interval():
    assert str(Estimate(0.5, -0.25, 1.125, 4)) == "+0.500 [-0.250, +1.125]"
