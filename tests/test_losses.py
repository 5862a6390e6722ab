import math

import pytest
import torch

from rglcd.losses import ConsistencyDistance, default_norm_c

# One sample whose difference is (3, 4): ‖·‖² = 25, d = 2.
PRED = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
TARGET = torch.zeros(1, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    "kind,c,expected",
    [
        ("l2", None, 12.5),
        ("huber", None, ((math.sqrt(9 + 1e-6) - 1e-3) + (math.sqrt(16 + 1e-6) - 1e-3)) / 2),
        ("huber", 1.0, ((math.sqrt(10) - 1) + (math.sqrt(17) - 1)) / 2),
        ("pseudo_huber", 1.0, math.sqrt(26) - 1),
        ("pseudo_huber", None, math.sqrt(25 + default_norm_c(2) ** 2) - default_norm_c(2)),
        ("cauchy", 1.0, math.log(1 + 25 / 2)),
        ("cauchy", 0.5, math.log(1 + 25 / 0.5)),
    ],
)
def test_distance_exact_values(kind, c, expected):
    value = ConsistencyDistance(kind, c)(PRED, TARGET)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_distances_are_per_sample_and_zero_at_equality():
    pred = torch.randn(3, 4, 2, 2)
    for kind in ("l2", "huber", "pseudo_huber", "cauchy"):
        distance = ConsistencyDistance(kind)
        assert distance(pred, pred).tolist() == [0.0, 0.0, 0.0]
        values = distance(pred, torch.zeros_like(pred))
        assert values.shape == (3,)
        for i in range(3):  # sample i's distance does not depend on the other samples
            assert values[i].item() == pytest.approx(distance(pred[i : i + 1], torch.zeros_like(pred[:1])).item())


def test_default_norm_c_is_icts():
    assert default_norm_c(4 * 64 * 64) == pytest.approx(0.00054 * 128)


def test_half_precision_inputs_are_upcast():
    pred = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    assert ConsistencyDistance("l2")(pred, torch.zeros_like(pred)).dtype == torch.float32


def test_bad_distance_settings():
    with pytest.raises(ValueError, match="unknown distance"):
        ConsistencyDistance("l1")
    with pytest.raises(ValueError, match="c must be > 0"):
        ConsistencyDistance("huber", c=0.0)


def test_the_target_is_cast_to_the_predictions_precision():
    """A float64 target against a float32 prediction is compared in float32 (the prediction's precision, at least
    float32): 1 − 1e-10 rounds to 1 there, so the l2 distance is exactly 1.0, in float32."""
    pred = torch.tensor([[1.0]], dtype=torch.float32)
    value = ConsistencyDistance("l2")(pred, torch.tensor([[1e-10]], dtype=torch.float64))
    assert value.dtype == torch.float32 and value.item() == 1.0
