import math

import pytest
import torch

from rglcd.metrics import high_frequency_share


def waves(size, frequency, amplitude=1.0):
    """A horizontal cosine of ``frequency`` cycles per pixel, [size, size]."""
    x = torch.arange(size, dtype=torch.float64)
    return amplitude * torch.cos(2 * math.pi * frequency * x).expand(size, size)


def test_high_frequency_share_of_pure_and_mixed_waves():
    low, high = waves(16, 2 / 16), waves(16, 6 / 16, amplitude=0.5)  # 0.125 and 0.375 cycles per pixel
    images = torch.stack([low, high, low + high, torch.full((16, 16), 0.7)])[:, None].expand(4, 3, 16, 16)
    shares = high_frequency_share(images)
    # Energy goes with amplitude²: 0.5² / (1 + 0.5²) = 0.2 for the mix; a flat image has no energy at all.
    torch.testing.assert_close(shares, torch.tensor([0.0, 1.0, 0.2, 0.0]), atol=1e-6, rtol=0)


def test_white_noise_spreads_its_energy_evenly_over_the_frequencies():
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # 17 of the 32 frequencies per axis are at most 0.25 cycles per pixel; the mean (DC) is removed.
    expected = (32 * 32 - 17 * 17) / (32 * 32 - 1)
    assert high_frequency_share(noise).mean().item() == pytest.approx(expected, abs=0.01)
