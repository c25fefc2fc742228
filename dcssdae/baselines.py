"""Baseline codecs at the same latent budget: what any compressed latent has to beat.

Bicubic resampling that keeps as many scalars as the latent has: an image of 3 x H x W pixel values and a latent
of c x (H/f) x (W/f) scalars give the ratio r = c / (3 f^2); the image is downsampled (antialiased bicubic) by
sqrt(r) on each side and upsampled back (bicubic). At 256 px: f16c16 and f8c4 keep 37 x 37 px, f32c32 26 x 26 px.
PSNR favours such blurry averages; perceptual metrics (LPIPS, ST-LPIPS) and rFID are where a generative decoder
must win.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def budget_size(height: int, width: int, latent_channels: int, downsample_factor: int) -> tuple[int, int]:
    """(h, w) of the RGB image that holds as many scalars as a (c, H/f, W/f) latent, aspect kept, >= 1 px."""
    if latent_channels < 1 or downsample_factor < 1:
        raise ValueError(f"latent_channels and downsample_factor must be >= 1, got {latent_channels}, "
                         f"{downsample_factor}")
    scale = math.sqrt(latent_channels / (3 * downsample_factor**2))
    return max(1, round(height * scale)), max(1, round(width * scale))


def bicubic_resample(x: Tensor, latent_channels: int, downsample_factor: int) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> bicubic down to the latent's budget and back up, clamped to [-1, 1]."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
    size = budget_size(x.shape[-2], x.shape[-1], latent_channels, downsample_factor)
    small = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1).to(x.dtype)


BASELINES = {"bicubic": bicubic_resample}


def baseline(name: str, x: Tensor, latent_channels: int, downsample_factor: int) -> Tensor:
    """Reconstruction of `x` by the baseline codec `name` (`BASELINES`) at the latent's budget."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    with torch.no_grad():
        return BASELINES[name](x, latent_channels, downsample_factor)
