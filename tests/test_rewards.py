"""The reward registry and ``mix``."""

import pytest
import torch

from rglcd.rewards import available_rewards, build_reward
from rglcd.rewards.pixel import Colorfulness


def test_every_builtin_reward_is_registered():
    paper = {"hpsv2", "hpsv2.1", "clipscore", "pickscore", "aesthetic", "imagereward"}
    assert paper | {"colorfulness", "mix", "world-clip", "world-aesthetic"} <= set(available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'hpsv9'; available: "):
        build_reward("hpsv9")


def test_mix_is_the_weighted_sum_of_standardised_terms():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mix = build_reward("mix", terms=[{"name": "colorfulness", "beta": 2.0, "mean": 0.1, "std": 0.5},
                                     {"name": "colorfulness", "beta": -1.0}])  # fmt: skip
    plain = Colorfulness()(images, [])
    torch.testing.assert_close(mix(images, ["p"] * 3), 2.0 * (plain - 0.1) / 0.5 - plain)
    # A pairwise softmax ignores shifts: the logits keep the scales and drop the means.
    torch.testing.assert_close(mix.logits(images, ["p"] * 3), 2.0 * plain / 0.5 - plain)
    assert not any(parameter.requires_grad for parameter in mix.parameters())


def test_mix_rejects_an_empty_list_and_a_non_positive_std():
    with pytest.raises(ValueError, match="at least one term"):
        build_reward("mix", terms=[])
    with pytest.raises(ValueError, match="std must be > 0"):
        build_reward("mix", terms=[{"name": "colorfulness", "std": 0.0}])


def test_colorfulness_exact_values_and_gradient():
    """Hasler & Süsstrunk on flat images: grey has no colour; pure red has rg = 1, yb = 0.5, no spread."""
    grey, red = torch.full((3, 4, 4), 0.5), torch.zeros(3, 4, 4)
    red[0] = 1.0
    images = torch.stack([grey, red]).requires_grad_(True)
    scores = build_reward("colorfulness")(images, ["grey", "red"])
    eps = 1e-8
    expected = [1.3 * eps**0.5, eps**0.5 + 0.3 * (1.25 + eps) ** 0.5]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    scores.sum().backward()
    assert images.grad is not None and images.grad[1].abs().sum() > 0
