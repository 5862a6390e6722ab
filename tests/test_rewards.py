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
