"""Any image size and large images: reflect padding to a multiple of the compression factor, and tiled evaluation of
a convolutional network with blended overlaps.

    x_pad, size = pad_to_multiple(x, f)         # (B, C, H, W) -> (B, C, H', W'), H' and W' multiples of f
    x = crop(x_pad, size)                       # back to (B, C, H, W)
    out = tiled_call(fn, x, context=(z,), tiling=Tiling(512, 128), factor=f)

Tiled evaluation (the overlap-and-blend scheme of tiled VAE decoding, as in diffusers' AutoencoderKL/DC tiling,
here with a window normalised by the sum of the weights): x is cut into overlapping tiles of side `tile` (the last
tile of a row or column is shifted back to end at the border), `fn` is evaluated on each tile and the outputs are
added with a separable window w(i) = sin^2(pi/2 * (i + 1/2) / overlap) rising over the first `overlap` pixels of a
tile and falling over its last `overlap`, then divided by the summed weights. Every weight is > 0, so each output
pixel is an average of the tiles that cover it and a pixel covered by one tile is that tile's output exactly.

For a multi-step decoder the *network evaluation* is tiled, not the sampling: the sampler runs on the whole image
with noise drawn once, so overlapping tiles see the same input at every step and agree there (no seams). Memory is
bounded by the tile size. Each tile sees only its own pixels: the decoder's windowed attention and the encoder's
linear attention attend within a tile, so tiled output differs slightly from untiled output away from the
borders' overlap too (an overlap of at least the decoder's attention reach, 8 * window // 2 px, keeps it small).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Padding to a multiple of the compression factor.


def pad_to_multiple(x: Tensor, factor: int, mode: str = "reflect") -> tuple[Tensor, tuple[int, int]]:
    """Pad the bottom and right of x (B, C, H, W) to sides that are multiples of `factor`; returns (x_pad, (H, W)).

    `reflect` mirrors the image at its border (no new edge); where a side is too short to mirror (padding >= side)
    the border pixels are repeated instead (`replicate`).
    """
    if x.ndim != 4:
        raise ValueError(f"pad_to_multiple expects (B, C, H, W), got shape {tuple(x.shape)}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    H, W = x.shape[-2:]
    pad_h, pad_w = -H % factor, -W % factor
    if pad_h == 0 and pad_w == 0:
        return x, (H, W)
    if mode == "reflect" and (pad_h >= H or pad_w >= W):
        mode = "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (H, W)


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The top-left (H, W) of x (undoes `pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]


# ----------------------------------------------------------------------------------------------------------------
# Tiles and blending window.


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in pixels of the image (both multiples of the compression factor when used)."""

    tile: int = 512
    overlap: int = 128

    def __post_init__(self):
        if not self.tile > 0:
            raise ValueError(f"tile side must be > 0, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must lie in [0, tile={self.tile}), got {self.overlap}")

    def check(self, factor: int) -> None:
        if self.tile % factor or self.overlap % factor:
            raise ValueError(f"tile side {self.tile} and overlap {self.overlap} must be multiples of the compression "
                             f"factor {factor}")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side `tile` with stride tile - overlap covering [0, size); the last ends at size."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def window(length: int, overlap: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Blending weights (length,) > 0: sin^2 ramps over the first and last `overlap` entries, 1 in between."""
    w = torch.ones(length, dtype=torch.float32, device=device)
    if overlap > 0:
        ramp = torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float32, device=device) + 0.5) / overlap)
        ramp = ramp.square()
        n = min(overlap, length)
        w[:n] = torch.minimum(w[:n], ramp[:n])
        w[length - n:] = torch.minimum(w[length - n:], ramp[:n].flip(0))
    return w.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Tiled evaluation.


def tiled_call(
    fn: Callable[..., Tensor],
    x: Tensor,
    context: Sequence[Tensor] = (),
    extra: Sequence = (),
    *,
    tiling: Tiling,
    factor: int,
    out_factor: int = 1,
) -> Tensor:
    """fn(x, *context, *extra) evaluated on overlapping tiles of x and blended.

    Args:
        fn: a network that maps a tile of x (B, C, h, w) and the matching context tiles to an output on a grid
            `out_factor` times coarser than x's: (B, C_out, h / out_factor, w / out_factor).
        x: (B, C, H, W), H and W multiples of `factor`.
        context: spatial tensors on a grid `factor` times coarser than x (e.g. the latent z), cut along.
        extra: arguments passed unchanged to every call (e.g. the flow-matching time t).
        tiling: tile side and overlap in pixels of x, multiples of `factor`.
        factor: compression factor between x and the context; tiles start at multiples of it.
        out_factor: 1 for a decoder (output in pixels), the compression factor for an encoder (output latent).
    """
    tiling.check(factor)
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"tiled evaluation needs sides that are multiples of {factor}, got {H}x{W} (pad first)")
    if H <= tiling.tile and W <= tiling.tile:
        return fn(x, *context, *extra)
    tile_h, tile_w = min(tiling.tile, H), min(tiling.tile, W)
    o = out_factor
    out = weights = None
    for top in tile_starts(H, tile_h, tiling.overlap):
        for left in tile_starts(W, tile_w, tiling.overlap):
            rows, cols = slice(top, top + tile_h), slice(left, left + tile_w)
            ctx_rows = slice(top // factor, (top + tile_h) // factor)
            ctx_cols = slice(left // factor, (left + tile_w) // factor)
            y = fn(x[..., rows, cols], *(c[..., ctx_rows, ctx_cols] for c in context), *extra)
            if out is None:
                out = torch.zeros((*y.shape[:-2], H // o, W // o), dtype=torch.float32, device=y.device)
                weights = torch.zeros((H // o, W // o), dtype=torch.float32, device=y.device)
            w = (window(tile_h // o, tiling.overlap // o, torch.float32, y.device)[:, None]
                 * window(tile_w // o, tiling.overlap // o, torch.float32, y.device)[None, :])
            out_rows, out_cols = slice(top // o, (top + tile_h) // o), slice(left // o, (left + tile_w) // o)
            out[..., out_rows, out_cols] += y.float() * w  # accumulated in float32, also for half inputs
            weights[out_rows, out_cols] += w
    return (out / weights).to(y.dtype)
