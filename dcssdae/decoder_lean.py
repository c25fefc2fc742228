"""Lean inference for the decoder's large conv levels: a ResBlock evaluated in row stripes without autograd, exact up
to fp32 rounding (used by `ResBlock.lean` in `decoder.py`; tests/test_decoder.py compares it with the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcssdae.decoder_layers import AdaGroupNorm

# ----------------------------------------------------------------------------------------------------
# Lean inference path: a ResBlock of a large level evaluated in row stripes.
#
# Without autograd a ResBlock need not hold its full-size intermediates (the concatenated input, the norm
# outputs, the upsampled map before the up conv). `ResBlock.lean` takes its input as a list of parts (the
# concatenation is never built), each a map or a map computed on demand (`_Upsampled`); the GroupNorm moments
# are accumulated over row stripes, then each stripe is normalised, modulated, activated and convolved with its
# one-row halo. Only the first conv's output and the block output are full-size. The same function as
# ResBlock.forward up to fp32 rounding (tests/test_decoder.py compares it with the reference path).


# Per-(sample, channel) moments over row stripes: the sums of x - K and (x - K)^2 in float64, K the first stripe's
# mean (the shift keeps the variance E[(x - K)^2] - E[x - K]^2 clear of cancellation when |mean| >> std).
class _Moments:
    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:  # x (B, C, R, W)
        x = x.permute(0, 2, 3, 1)  # channels innermost: the sums below are one contiguous pass
        if self.shift is None:
            self.shift = x.mean(dim=(1, 2), keepdim=True)
        d = x - self.shift
        self.n += x.shape[1] * x.shape[2]
        self.s1 = self.s1 + d.sum(dim=(1, 2)).double()  # fp32 within a stripe (cascade sums), fp64 across
        self.s2 = self.s2 + d.square_().sum(dim=(1, 2)).double()

    def mean_m2(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and sum of squared deviations, (B, C) float64 each."""
        mean = self.s1 / self.n
        return self.shift.reshape(mean.shape).double() + mean, self.s2 - self.s1 * mean


# AdaGN of a map known by its channel moments, as one affine map per (sample, channel, latent cell):
# AdaGN(x) = x * mul + add with mul = rstd_g (1 + scale), add = shift - mean_g rstd_g (1 + scale), g the group of
# the channel (consecutive channels of the concatenated parts: a group may straddle two parts).
def _adagn_affine(norm: AdaGroupNorm, moments: list[_Moments], ctx: torch.Tensor):
    n = moments[0].n
    mean, m2 = (torch.cat(m, dim=1) for m in zip(*(m.mean_m2() for m in moments), strict=True))  # (B, C)
    B, C = mean.shape
    mean_c, m2_c = mean.view(B, norm.groups, -1), m2.view(B, norm.groups, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    m2_g = m2_c.sum(-1, keepdim=True) + n * (mean_c - mean_g).square().sum(-1, keepdim=True)
    var_g = m2_g / (n * mean_c.shape[-1])
    rstd = (var_g + norm.eps).rsqrt()
    rstd, mean_g = (s.expand(B, norm.groups, C // norm.groups).reshape(B, C, 1, 1) for s in (rstd, mean_g))
    scale, shift = norm.ctx_proj(ctx).chunk(2, dim=1)  # (B, C, h, w) each
    gain = rstd * (1 + scale.double())
    mul, add = gain.to(scale.dtype), (shift.double() - mean_g * gain).to(scale.dtype)
    return tuple(m.contiguous(memory_format=torch.channels_last) for m in (mul, add))  # so are their rows


# Nearest x2 upsampling then a 3x3 conv (the U-Net's `l{i}_up`), computed on demand for rows of its output from
# the low-resolution map, in sub-pixel form: each output pixel sees a 2x2 neighbourhood of the low map through one
# of four 2x2 kernels (the sums of the 3x3 taps that land on the same low pixel): 4/9 of the multiply-adds and no
# upsampled copy. One conv with the four kernels stacked gives, at low position (i, j), the output pixels
# (2i - 1 + sy, 2j - 1 + sx), (sy, sx) in {0, 1}^2; tap k of the 3x3 kernel lands on low offset (s + k) // 2 - 1.
class _Upsampled:
    def __init__(self, low: torch.Tensor, up: nn.Sequential):
        conv = up[1]
        B, _, h, w = low.shape
        self.low, self.shape = low, (B, conv.out_channels, 2 * h, 2 * w)
        taps = torch.zeros(2, 2, 3, dtype=conv.weight.dtype, device=low.device)  # [s, a, k]
        for s in (0, 1):
            for k in range(3):
                taps[s, (s + k) // 2, k] = 1
        weight = torch.einsum("yak,xbl,oikl->yxoiab", taps, taps, conv.weight)  # (2, 2, Cout, Cin, 2, 2)
        self.weight = weight.reshape(4 * conv.out_channels, conv.in_channels, 2, 2)
        self.bias = conv.bias.repeat(4)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the output, (B, C, b - a, W) channels-last."""
        B, C, H, W = self.shape
        h = H // 2
        i0, i1 = (a + 1) // 2, b // 2 + 1  # low positions i0..i1-1 give the output rows 2*i0 - 1 .. 2*i1 - 2
        low = self.low[:, :, max(i0 - 1, 0) : min(i1, h)]
        low = F.pad(low, (0, 0, int(i0 == 0), int(i1 > h)))  # the conv's zero rows outside the map
        o = F.conv2d(low, self.weight, self.bias, padding=(0, 1))  # (B, 4C, i1 - i0, W/2 + 1)
        R, w1 = o.shape[-2:]
        o = o.permute(0, 2, 3, 1).reshape(B, R, w1, 2, 2, C).transpose(2, 3).reshape(B, 2 * R, 2 * w1, C)
        first = 2 * i0 - 1
        return o[:, a - first : b - first, 1 : W + 1].permute(0, 3, 1, 2)


LEAN_MIN_PIXELS = 256 * 256  # default of UViTDecoder.lean_min_pixels
STRIPE_ROWS = 16  # default of UViTDecoder.stripe_rows


def _part_rows(part, a: int, b: int) -> torch.Tensor:
    return part[:, :, a:b] if isinstance(part, torch.Tensor) else part.rows(a, b)


# A lean block call (parts[0] upsampled by `up` inside it, if given). Eager even in a compiled decoder: the row
# stripes give the compiler nothing to fuse, and a traced copy would not free the parts as they are read.
@torch.compiler.disable
def _lean(block, parts: list, ctx: torch.Tensor, stripe_rows: int, up=None, reuse=None) -> torch.Tensor:
    if up is not None:
        parts[0] = _Upsampled(parts[0], up)
    return block.lean(parts, ctx, stripe_rows, reuse=reuse)
