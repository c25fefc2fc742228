"""Bicubic resampling at the latent's budget: the baseline printed beside the model at validation."""

import pytest
import torch
import torch.nn.functional as F

from dcssdae.baselines import baseline, bicubic_resample, budget_size


def test_budget_size_keeps_the_latent_scalars():
    # f16c16 and f8c4 keep 1/48 of the values: 256 px -> 37 px; f32c32 keeps 1/96: 26 px
    assert budget_size(256, 256, 16, 16) == budget_size(256, 256, 4, 8) == (37, 37)
    assert budget_size(256, 256, 32, 32) == (26, 26)
    h, w = budget_size(256, 384, 32, 32)
    assert (h, w) == (26, 39) and abs(3 * h * w - 32 * 8 * 12) / (32 * 8 * 12) < 0.05
    with pytest.raises(ValueError, match="latent_channels"):
        budget_size(256, 256, 0, 8)


def _smooth_images(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_bicubic_baseline_is_better_with_a_larger_budget():
    x = _smooth_images()
    errors = [(bicubic_resample(x, c, 8) - x).square().mean().item() for c in (1, 4, 12, 192)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8  # c = 3 * 8^2 at f8 keeps every value: the identity
    out = baseline("bicubic", x, 4, 8)
    assert out.shape == x.shape and out.dtype == x.dtype and out.abs().max() <= 1
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline("jpeg", x, 4, 8)
    with pytest.raises(ValueError, match="expected images"):
        bicubic_resample(x[:, :1], 4, 8)
