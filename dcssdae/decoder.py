"""SSDD U-ViT decoder: (x_t, z, t | None) -> pred.

Vallaeys, Verbeek, Cord, "SSDD: Single-Step Diffusion Decoder for Efficient Image Tokenization" (2025): a
pixel-space U-Net of four convolutional ResNet levels whose middle is a transformer at 1/8 resolution,
conditioned on the latent z through adaptive normalisation (AdaGN in the conv blocks, AdaLN in the
transformer), with GEGLU feed-forwards and windowed self-attention carrying a learned relative position bias.

Differences from the published SSDD code, on purpose (see docs and the DC-SSDAE write-up):
  * z enters through its own head: a 1x1 projection, nearest-upsampled to the image (both commute, so
    projecting first is exact and f^2 cheaper), concatenated with the projected noisy image, then a 3x3 conv.
    No BatchNorm on z: nothing in this network uses batch statistics, so sample i never depends on sample j.
  * The relative-bias table is gathered into the attention bias on every forward (only integer index tensors
    are cached, keyed by the grid size). The default backend never builds an N x N bias: on the CPU the grid is
    cut into 8 x 8 query tiles that attend to their key halo (bias (T*heads, 64, (8+2r)^2), shared by the
    batch, T = 8 tiles at a time), on CUDA FlexAttention skips the masked blocks. The dense "sdpa" backend
    ((1, heads, N, N), shared by the batch) is kept as the reference.
  * Speed without changing the function: the conv levels run channels-last, and without autograd the AdaGN
    modulation and the SiLU overwrite the norm's output (tests/test_decoder.py compares every fast path with
    the reference path, values and gradients).
  * Lean inference (`ResBlock.lean`, exact up to fp32 rounding): without autograd, on the CPU, eager, the
    blocks on maps of at least `lean_min_pixels` (256^2) run in row stripes: the concatenated input, the norm
    outputs and the upsampled map are never stored (GroupNorm moments are summed over stripes, the up conv runs
    in sub-pixel form inside the next block), outputs overwrite skips that are no longer needed, and the input
    head is recomputed for the last block instead of held (when half resolution is lean too). S at 512 px: peak
    working memory 644 -> 275 MiB (bench_networks.py, CPU); eager inside a compiled decoder too.
  * Window side 17 (offsets -8..+8) as the SSDD text says (the published code used 15).
  * Time conditioning is optional (`time_conditioned`): flow matching needs it, Equilibrium Matching has none
    and then no time module is built at all. The time embedding (sinusoidal of t*1000 -> MLP) is added to the
    z-context map, so it reaches every AdaGN/AdaLN modulation (SSDD's code fed t only to the second norm of
    each ResBlock).

Initialisation (stated once here, done in the constructors): every residual branch ends in a zero-initialised
layer (ResBlock second conv, attention output projection, feed-forward output) and every AdaGN/AdaLN
modulation starts at identity (zero projection: scale 0, shift 0). The final conv is zero-initialised too, so
the first prediction is 0 (both targets, the FM velocity and the EqM field, are centred), as in DiT's
adaLN-Zero + zero final layer. This does not block learning: the first backward pass reaches the final conv
(its input is non-zero); once it is non-zero the residual outputs get gradients, then the modulations, then
the z-context net (tests/test_decoder.py checks that four backward passes, three SGD steps, reach every
parameter).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Helpers.


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020), of t*1000 as in SSDD.
def _timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


# GroupNorm (Wu & He 2018). Under torch.compile at inference it runs as one opaque call of the eager kernel:
# Inductor's own group-norm reduction over a channels-last map is ~20x slower on the CPU (measured, S at 256 px,
# torch 2.14), which made the compiled decoder slower than the eager one. With autograd or under autocast (which
# runs group norm in fp32) it is F.group_norm.
def _group_norm(x, groups: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    opaque = not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
    if torch.compiler.is_compiling() and opaque:
        return _group_norm_kernel(x, groups, eps, weight, bias)
    return F.group_norm(x, groups, weight, bias, eps)


@torch.library.custom_op("dcssdae::group_norm", mutates_args=())
def _group_norm_kernel(
    x: torch.Tensor, groups: int, eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.group_norm(x, groups, weight, bias, eps)


@_group_norm_kernel.register_fake
def _(x, groups, eps, weight, bias):
    return torch.empty_like(x)  # same shape, dtype and memory format as the eager kernel's output


# Adaptive modulation x * (1 + scale) + shift, with (scale, shift) given on a coarser grid and
# nearest-upsampled by broadcasting (no upsampled copy is materialised); `inplace` writes the result into x
# (inference: x is a fresh norm output).
def _modulate_map(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    return _affine_map(x, 1 + scale, shift, out=x if inplace else None)


# x * mul + add with (mul, add) on a coarser grid, nearest-upsampled by broadcasting. Maps: x (B, C, H, W),
# mul/add (B, C, h, w), H = h * rh. A channels-last x (or a row stripe of one) is computed through a
# channels-innermost view (one contiguous pass, and the result stays channels-last). `out`: a tensor of x's shape
# and layout to write into.
def _affine_map(
    x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    B, C, H, W = x.shape
    h, w = mul.shape[-2:]
    if x.stride(1) == 1 and not x.is_contiguous():  # channels innermost

        def split(m):  # (B, H, W, C) -> (B, h, H/h, w, W/w, C), a view
            return m.permute(0, 2, 3, 1).view(B, h, H // h, w, W // w, C)

        mul, add = (m.permute(0, 2, 3, 1)[:, :, None, :, None] for m in (mul, add))  # (B, h, 1, w, 1, C)
        y = torch.addcmul(add, split(x), mul, out=None if out is None else split(out))
        return y.reshape(B, H, W, C).permute(0, 3, 1, 2)  # a view (reshape: the compiler's stride guesses)
    x6 = x.view(B, C, h, H // h, w, W // w)
    mul, add = mul[:, :, :, None, :, None], add[:, :, :, None, :, None]
    out6 = None if out is None else out.view(B, C, h, H // h, w, W // w)
    return torch.addcmul(add, x6, mul, out=out6).reshape(B, C, H, W)


# Same for tokens: x (B, N, D) on a row-major (Hg, Wg) grid, scale/shift (B, h, w, D).
def _modulate_tokens(
    x: torch.Tensor, grid: tuple[int, int], scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    B, N, D = x.shape
    (Hg, Wg), (h, w) = grid, scale.shape[1:3]
    x = x.view(B, h, Hg // h, w, Wg // w, D)
    return torch.addcmul(shift[:, :, None, :, None], x, 1 + scale[:, :, None, :, None]).view(B, N, D)


# Small integer / boolean index tensors that depend on the token grid only (never on parameter values) are built
# once per grid and device and cached; under torch.compile they are traced into the graph instead (constants
# there). They are built outside inference mode: a tensor first built under torch.inference_mode (validation)
# could not be saved for backward by a later training step.
def _grid_index_cache(build):
    @functools.lru_cache(maxsize=32)
    def cached(*args):
        with torch.inference_mode(False):
            return build(*args)

    @functools.wraps(build)
    def index(*args):
        return build(*args) if torch.compiler.is_compiling() else cached(*args)

    index.cache_clear = cached.cache_clear
    return index


# Index of the relative offset (key - query) along one axis of length n into a window table padded by one
# entry on each side: offsets -r..r map to 1..2r+1, every offset outside the window maps to the border (0 or
# 2r+2).
@_grid_index_cache
def _offset_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(n, device=device)
    return (pos[None, :] - pos[:, None] + radius + 1).clamp(0, 2 * radius + 2)  # (n, n)


# FlexAttention block mask of the window |dy| <= r and |dx| <= r (depends on the grid only, cached; built
# outside any torch.compile graph).
@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def _window_block_mask(Hg: int, Wg: int, radius: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        dy, dx = kv_idx // Wg - q_idx // Wg, kv_idx % Wg - q_idx % Wg
        return (dy.abs() <= radius) & (dx.abs() <= radius)

    with torch.inference_mode(False):  # cached: see _grid_index_cache
        return create_block_mask(in_window, B=None, H=None, Q_LEN=Hg * Wg, KV_LEN=Hg * Wg, device=device)


# Tiling of the token grid for the blocked window attention: query tiles of t x t tokens, each attending to
# the (t + 2r) x (t + 2r) keys around it (a halo of r per side). Returns:
#   offset (t^2, K^2): index of each (query, key) pair of a tile into the window table padded by one -inf entry
#       per side (flattened, side 2r + 3); pairs outside the window index the border. The same for every tile.
#   valid (T, K^2): whether each key of each tile lies on the grid (keys in the halo past the edge are padding).
@_grid_index_cache
def _window_tiles(Hg: int, Wg: int, radius: int, tile: int, device: torch.device):
    r, t, Ks, side = radius, tile, tile + 2 * radius, 2 * radius + 3
    d = torch.arange(Ks, device=device)[None, :] - r - torch.arange(t, device=device)[:, None]  # (t, Ks)
    axis = torch.where(d.abs() <= r, d + r + 1, 0)  # index along one padded-table axis; 0: the border
    border = (axis[:, None, :, None] == 0) | (axis[None, :, None, :] == 0)
    offset = torch.where(border, 0, axis[:, None, :, None] * side + axis[None, :, None, :]).reshape(t * t, -1)

    def on_grid(n):  # (tiles along the axis, Ks): key position inside [0, n)
        k = torch.arange(-(-n // t), device=device)[:, None] * t - r + torch.arange(Ks, device=device)
        return (k >= 0) & (k < n)

    vy, vx = on_grid(Hg), on_grid(Wg)
    return offset, (vy[:, None, :, None] & vx[None, :, None, :]).reshape(-1, Ks * Ks)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# ----------------------------------------------------------------------------------------------------
# Layers.


# Adaptive group normalisation (AdaGN, Dhariwal & Nichol 2021, Sec. 3.3): GroupNorm(x) * (1 + scale) + shift,
# with (scale, shift) a 1x1 projection of the conditioning map at latent resolution, nearest-upsampled to x.
class AdaGroupNorm(nn.Module):
    def __init__(self, channels: int, ctx_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.ctx_proj = _zero_(nn.Conv2d(ctx_channels, 2 * channels, 1))  # identity at init

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """AdaGN(x), followed by SiLU if `silu`. Without autograd (inference) the modulation and the SiLU
        overwrite the norm's output instead of allocating two more full-size tensors (same values); under
        torch.compile the compiler fuses them instead."""
        scale, shift = self.ctx_proj(ctx).chunk(2, dim=1)  # (B, C, h, w) each
        y = _group_norm(x, self.groups, self.eps)
        # in place only when autograd records nothing here (a frozen level can still have trainable modulations)
        inplace = not (y.requires_grad or scale.requires_grad) and not torch.compiler.is_compiling()
        y = _modulate_map(y, scale, shift, inplace=inplace)
        return F.silu(y, inplace=inplace) if silu else y


# Adaptive layer normalisation (AdaLN, Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023,
# Sec. 3.2): LayerNorm(x) * (1 + scale) + shift, modulation from the conditioning tokens (latent grid, nearest
# to the token grid).
class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int, ctx_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.ctx_proj = _zero_(nn.Linear(ctx_channels, 2 * dim))  # identity at init

    def forward(self, x, grid, ctx_tokens):
        scale, shift = self.ctx_proj(ctx_tokens).chunk(2, dim=-1)  # (B, h, w, D) each
        return _modulate_tokens(F.layer_norm(x, x.shape[-1:], eps=self.eps), grid, scale, shift)


# Windowed multi-head self-attention with a learned relative position bias (Shaw et al. 2018; Swin, Liu et al.
# 2021, Eq. 4): softmax(q k^T / sqrt(d) + B) v where B[h, i, j] = table[h, dy, dx] for |dy|, |dx| <= r and
# -inf outside. Backends, all the same function: "sdpa" (the dense (heads, N, N) bias; the reference),
# "blocked" (query tiles against their key halo: nothing N x N), "flex" (FlexAttention), "auto" (flex on CUDA,
# where it is compiled, blocked elsewhere).
ATTENTION_BACKENDS = ("auto", "sdpa", "blocked", "flex")
TILE = 8  # query tile side of the blocked backend (at most r + 1: see _blocked)
CHUNK_TILES = 8  # tiles the blocked backend attends at once (bounds its working memory)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, backend: str):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")
        self.heads, self.radius, self.backend = heads, window // 2, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = _zero_(nn.Linear(dim, dim))  # zero residual output
        self.rel_bias = nn.Parameter(torch.zeros(heads, window, window))  # (2r+1)^2 entries per head

    def window_bias(self, grid: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The additive bias (heads, N, N), rebuilt from the current table (gradients flow into the table).

        Gathered in the table's dtype (fp32: the gradient sums ~N entries per offset), then cast to `dtype`.
        Size: heads * N^2 * bytes, shared by the batch; e.g. S at 512 px: 4 * 4096^2 * 2 B = 128 MiB per block
        in bf16 (kept for backward when training), plus a transient fp32 copy while it is built.
        """
        (Hg, Wg), r = grid, self.radius
        iy, ix = _offset_index(Hg, r, self.rel_bias.device), _offset_index(Wg, r, self.rel_bias.device)
        # pad the table with a -inf border: every offset outside the window indexes the border
        table = F.pad(self.rel_bias, (1, 1, 1, 1), value=float("-inf"))
        bias = table[:, iy[:, None, :, None], ix[None, :, None, :]]  # (heads, Hg, Wg, Hg, Wg)
        return bias.reshape(self.heads, Hg * Wg, Hg * Wg).to(dtype or table.dtype)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        # one fused projection -> q, k, v each (B, heads, N, d)
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        backend = self.backend
        if backend == "auto":
            backend = "flex" if q.is_cuda else "blocked"
        if backend == "flex":
            out = self._flex(q, k, v, grid)
        elif backend == "blocked":
            out = self._blocked(q, k, v, grid)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.window_bias(grid, q.dtype)[None])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def _blocked(self, q, k, v, grid):
        # Same maths on tiles: the grid is cut into T tiles of t x t queries (padded up to a multiple of t);
        # each tile attends to the K^2 = (t + 2r)^2 keys around it (zero-padded past the edges), with the bias
        # gathered once per forward from the table for one tile (heads, t^2, K^2) and -inf on the padding keys.
        # Every padding query (row or column past the edge, dropped at the end) is within r of a grid token,
        # since t <= r + 1, so no softmax row is empty. Memory: (T * heads, t^2, K^2) scores, not N^2, and
        # the tiles go in chunks of whole tile rows of about CHUNK_TILES tiles.
        (Hg, Wg), r, (B, heads, N, d) = grid, self.radius, q.shape
        t = min(TILE, r + 1)
        nty, ntx, Ks = -(-Hg // t), -(-Wg // t), t + 2 * r
        Hp, Wp, T = nty * t, ntx * t, nty * ntx
        offset, valid = _window_tiles(Hg, Wg, r, t, q.device)
        table = F.pad(self.rel_bias, (1, 1, 1, 1), value=float("-inf")).flatten(1)  # (heads, (2r + 3)^2)
        bias = table[:, offset].to(q.dtype)  # (heads, t^2, K^2), the same for every tile
        q = F.pad(q.view(B, heads, Hg, Wg, d), (0, 0, 0, Wp - Wg, 0, Hp - Hg))
        q = q.view(B, heads, nty, t, ntx, t, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(B, T * heads, t * t, d)

        def halo(x):  # (B, heads, N, d) -> (B, heads, nty, ntx, d, Ks, Ks), a view: the keys around each tile
            x = F.pad(x.view(B, heads, Hg, Wg, d), (0, 0, r, r + Wp - Wg, r, r + Hp - Hg))
            return x.unfold(2, Ks, t).unfold(3, Ks, t)

        k, v = halo(k), halo(v)
        out = []
        chunk = max(1, CHUNK_TILES // ntx)  # tile rows per chunk
        for y0 in range(0, nty, chunk):
            y1 = min(y0 + chunk, nty)
            # Tc tiles, folded into the head axis so that the bias broadcasts over the batch
            Tc = (y1 - y0) * ntx
            qc = q[:, y0 * ntx * heads : y1 * ntx * heads]
            kc, vc = (x[:, :, y0:y1].permute(0, 2, 3, 1, 5, 6, 4).reshape(B, Tc * heads, -1, d) for x in (k, v))
            bc = bias.masked_fill(~valid[y0 * ntx : y1 * ntx, None, None, :], float("-inf"))  # (Tc, heads, t^2,
            # K^2)
            out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bc.view(1, Tc * heads, t * t, -1)))
            del kc, vc, bc  # before the next chunk's are built
        out = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        out = out.view(B, nty, ntx, heads, t, t, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(B, heads, Hp, Wp, d)
        return out[:, :, :Hg, :Wg].reshape(B, heads, N, d)

    def _flex(self, q, k, v, grid):
        # Same maths through FlexAttention: the window is a sparse block mask (masked blocks are skipped) and
        # the table enters as a score_mod; nothing N x N is stored. Compiled on CUDA; eager (forward only)
        # elsewhere.
        from torch.nn.attention.flex_attention import flex_attention

        (Hg, Wg), r, side = grid, self.radius, 2 * self.radius + 1
        table = self.rel_bias.flatten(1)  # (heads, side^2)

        def add_relative_bias(score, b, h, q_idx, kv_idx):
            # offsets are clamped only for pairs that the block mask drops anyway
            dy = (kv_idx // Wg - q_idx // Wg).clamp(-r, r)
            dx = (kv_idx % Wg - q_idx % Wg).clamp(-r, r)
            return score + table[h, (dy + r) * side + (dx + r)]

        compiled = q.is_cuda and not torch.compiler.is_compiling()  # inside a compiled model: traced as is
        attend = _compiled_flex_attention() if compiled else flex_attention
        return attend(
            q, k, v, score_mod=add_relative_bias, block_mask=_window_block_mask(Hg, Wg, r, q.device)
        )


# GEGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020, Eq. 6): (x W * GELU(x V)) W2.
class GEGLU(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = _zero_(nn.Linear(mult * dim, dim))  # zero residual output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without autograd, in chunks of tokens: the hidden activations (2 * mult * D per token) are the largest
        # tensors of the middle
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.shape[-2] <= FF_CHUNK_TOKENS:
            return self._ff(x)
        return torch.cat([self._ff(c) for c in x.split(FF_CHUNK_TOKENS, dim=-2)], dim=-2)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


FF_CHUNK_TOKENS = 1024  # tokens per GEGLU chunk without autograd (one chunk up to a 32 x 32 grid)


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


# ----------------------------------------------------------------------------------------------------
# Blocks.


# ResNet block with AdaGN in both norms (SSDD conv levels; Ho et al. 2020 ResNet block, Dhariwal & Nichol 2021
# AdaGN).
class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, ctx_channels: int, groups: int):
        super().__init__()
        self.norm1 = AdaGroupNorm(in_channels, ctx_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, ctx_channels, groups)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))  # zero residual output
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, ctx):
        h = self.conv1(self.norm1(x, ctx, silu=True))
        h = self.conv2(self.norm2(h, ctx, silu=True))
        return h.add_(self.skip(x))  # in place: no backward formula needs conv2's output

    def lean(self, parts: list, ctx: torch.Tensor, stripe_rows: int, reuse: torch.Tensor | None = None):
        """forward(cat(parts), ctx) without autograd, in row stripes of `stripe_rows` (see the section "Lean
        inference path"). `parts`: maps (B, C_k, H, W) or `_Upsampled`, consumed: the list is emptied once they
        are read, so each is freed when the caller holds no other reference. `reuse`: a map of the output's shape
        the caller no longer needs (it may be the last part): the output is written into it."""
        B, _, H, W = parts[0].shape
        rh = H // ctx.shape[-2]
        latent_row = torch.arange(H, device=ctx.device) // rh
        stripes = [(a, min(a + stripe_rows, H)) for a in range(0, H, stripe_rows)]

        def stripe_affine(affine, lo, hi):  # the (mul, add) rows of image rows [lo, hi): (B, C, hi - lo, w)
            return (m.permute(0, 2, 3, 1)[:, latent_row[lo:hi]].permute(0, 3, 1, 2) for m in affine)

        def halo_pad(y, a, b, lo, hi):  # zero rows where the 3x3 conv's halo leaves the image
            return F.pad(y, (0, 0, lo - (a - 1), b + 1 - hi)) if lo == a or hi == b else y

        # GroupNorm moments of the concatenated input, over stripes (an _Upsampled part is computed here once
        # and once more below); the stripe edges are odd rows, where _Upsampled wastes nothing
        moments = [_Moments() for _ in parts]
        edges = [0, *range(2 * stripe_rows - 1, H, 2 * stripe_rows), H]
        for part, m in zip(parts, moments, strict=True):
            for a, b in itertools.pairwise(edges):
                m.add(_part_rows(part, a, b))
        affine = _adagn_affine(self.norm1, moments, ctx)

        # conv1(SiLU(AdaGN(x))) stripe by stripe into h1 (and its moments); the skip branch goes into the output.
        # Where the output overwrites a part, stripe k's skip rows are written once stripe k + 1 has read its halo.
        cout = self.conv1.out_channels
        fits = reuse is not None and reuse.shape == (B, cout, H, W) and reuse.stride(1) == 1
        like = {"dtype": ctx.dtype, "device": ctx.device, "memory_format": torch.channels_last}
        out = reuse if fits else torch.empty(B, cout, H, W, **like)
        delay = any(p is out for p in parts)
        h1 = torch.empty_like(out)
        h1_moments, pending = _Moments(), None
        for a, b in stripes:
            lo, hi = max(a - 1, 0), min(b + 1, H)
            x = torch.cat([_part_rows(p, lo, hi) for p in parts], dim=1)  # (B, Cin, hi - lo, W)
            if pending is not None:
                out[:, :, pending[0] : pending[1]] = pending[2]
            raw = x[:, :, a - lo : b - lo]
            skip = self.skip(raw)
            if delay:
                pending = (a, b, skip.clone() if skip is raw else skip)
            else:
                out[:, :, a:b] = skip
            y = F.silu(_affine_map(x, *stripe_affine(affine, lo, hi), out=x), inplace=True)
            h = F.conv2d(halo_pad(y, a, b, lo, hi), self.conv1.weight, self.conv1.bias, padding=(0, 1))
            h1_moments.add(h)
            h1[:, :, a:b] = h
        if pending is not None:
            out[:, :, pending[0] : pending[1]] = pending[2]
        parts.clear()
        del x, raw, skip, y, h, pending

        # out += conv2(SiLU(AdaGN(h1))), stripe by stripe
        affine = _adagn_affine(self.norm2, [h1_moments], ctx)
        for a, b in stripes:
            lo, hi = max(a - 1, 0), min(b + 1, H)
            y = F.silu(_affine_map(h1[:, :, lo:hi], *stripe_affine(affine, lo, hi)), inplace=True)
            y = halo_pad(y, a, b, lo, hi)
            out[:, :, a:b] += F.conv2d(y, self.conv2.weight, self.conv2.bias, padding=(0, 1))
        return out


# Pre-norm transformer block: x + Attn(AdaLN(x)), then x + GEGLU(AdaLN(x)).
class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, window, ff_mult, ctx_channels, backend):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, ctx_channels)
        self.attn = WindowAttention(dim, heads, window, backend)
        self.norm2 = AdaLayerNorm(dim, ctx_channels)
        self.ff = GEGLU(dim, ff_mult)

    def forward(self, x, grid, ctx_tokens):
        x = x + self.attn(self.norm1(x, grid, ctx_tokens), grid)
        return x + self.ff(self.norm2(x, grid, ctx_tokens))


# U-ViT middle (SSDD): GroupNorm -> Linear -> transformer blocks on the (H/8 x W/8) token grid -> Linear, +
# residual.
class MiddleTransformer(nn.Module):
    def __init__(self, dim, depth, heads, window, ff_mult, ctx_channels, groups, backend):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, window, ff_mult, ctx_channels, backend) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, ctx, return_tokens_at=None):
        B, D, Hg, Wg = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, Hg * Wg, D))  # (B, N, D); a view if
        # x is channels-last
        ctx_tokens = ctx.permute(0, 2, 3, 1)  # (B, h, w, C0)
        tokens = None
        for i, block in enumerate(self.blocks):
            h = block(h, (Hg, Wg), ctx_tokens)
            if i == return_tokens_at:
                tokens = h  # (B, N, D), for REPA
        return x + self.proj_out(h).view(B, Hg, Wg, D).permute(0, 3, 1, 2), tokens


# ----------------------------------------------------------------------------------------------------
# The network.


class UViTDecoder(nn.Module):
    """SSDD U-ViT decoder (Vallaeys et al. 2025): predicts the diffusion target of `x_t` given latent `z`."""

    def __init__(
        self,
        latent_channels: int,
        image_channels: int = 3,
        extra_out_channels: int = 0,
        channels: int = 48,
        channel_mult: tuple[int, ...] = (1, 2, 3, 3),
        layers_per_block: int = 2,
        mid_depth: int = 8,
        mid_heads: int | None = None,
        max_heads: int = 16,
        window: int = 17,
        ff_mult: int = 4,
        norm_groups: int = 32,
        time_conditioned: bool = False,
        attention_backend: str = "auto",
        latent_skip: bool = False,
    ):
        """
        Args:
            latent_channels: channels c of z (B, c, H/f, W/f); f may be any multiple of 8 (8..128).
            image_channels: channels of x_t and of the prediction.
            extra_out_channels: output channels beyond the image's (maps a parameterisation reads besides the
                image, e.g. the gate of EqM's gated denoiser); the output has image_channels + extra_out_channels.
            channels: base width; level i has round_up(channels * channel_mult[i], norm_groups) channels.
            channel_mult: width multipliers of the four U-Net levels (the last one is the transformer width).
            layers_per_block: ResNet blocks per level on the way down (one more on the way up).
            mid_depth: number of transformer blocks at 1/8 resolution.
            mid_heads: attention heads; default min(max_heads, max(4, width // 64)) as in SSDD.
            max_heads: cap of the default head count.
            window: side of the attention window (odd): tokens see neighbours within +-window//2 per axis.
            ff_mult: GEGLU hidden width multiplier.
            norm_groups: GroupNorm groups (channel counts are rounded up to a multiple of it).
            time_conditioned: build the time embedding (flow matching); False for Equilibrium Matching.
            attention_backend: "auto" (flex on CUDA, blocked elsewhere), "sdpa" (dense shared bias, any device;
                the reference), "blocked" (query tiles against their key halo, any device, nothing N x N) or
                "flex" (FlexAttention block mask + score_mod; compiled on CUDA, forward-only elsewhere).
            latent_skip: add a learned linear map of z (1x1 conv to the image channels, zero at init, upsampled
                bilinearly) to the image channels of the prediction: a direct path for the low frequencies, the
                decoder-side counterpart of DC-AE's residual shortcuts (Chen et al. 2025, Sec. 3.2). Not in SSDD
                (False in every preset); the CPU quick-start uses it (README, "Low frequencies and the latent skip").
        """
        super().__init__()
        if len(channel_mult) != 4:
            raise ValueError(f"channel_mult needs 4 levels (the transformer runs at 1/8), got {channel_mult}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd side (e.g. 17), got {window}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention_backend {attention_backend!r}; known: {', '.join(ATTENTION_BACKENDS)}"
            )
        widths = [_round_up(channels * m, norm_groups) for m in channel_mult]
        c0, dim = widths[0], widths[-1]
        heads = mid_heads or min(max_heads, max(4, dim // 64))
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by mid_heads={heads}")
        self.latent_channels, self.image_channels = latent_channels, image_channels
        self.time_conditioned, self.window, self.widths = time_conditioned, window, widths
        self.mid_dim, self.mid_depth, self.mid_heads = dim, mid_depth, heads

        # Conditioning map at latent resolution, drives every AdaGN/AdaLN: a small conv net on z, plus (flow
        # matching only) the time embedding broadcast over the map (conditioning sum as in DiT). EqM builds no
        # time module.
        self.ctx = nn.Sequential(
            nn.Conv2d(latent_channels, c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c0, 3, padding=1)
        )
        if time_conditioned:
            self.time_mlp = nn.Sequential(nn.Linear(c0, 4 * c0), nn.SiLU(), nn.Linear(4 * c0, c0))

        # Input heads: noisy image and z (projected, nearest-upsampled) concatenated, then a 3x3 conv.
        self.x_in = nn.Conv2d(image_channels, c0 // 2, 3, padding=1)
        self.z_in = nn.Conv2d(latent_channels, c0 - c0 // 2, 1)
        self.conv_in = nn.Conv2d(c0, c0, 3, padding=1)

        # U-Net: enc/dec keyed "l{level}_block{j}" / "l{level}_down|up" so the printout follows the figure.
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        skips, c = [c0], c0
        for i, w in enumerate(widths):
            for j in range(layers_per_block):
                self.enc[f"l{i}_block{j}"] = ResBlock(c, w, c0, norm_groups)
                c = w
                skips.append(c)
            if i < 3:
                self.enc[f"l{i}_down"] = nn.Conv2d(c, c, 3, stride=2, padding=1)
                skips.append(c)
        self.mid = MiddleTransformer(
            dim, mid_depth, heads, window, ff_mult, c0, norm_groups, attention_backend
        )
        for i, w in reversed(list(enumerate(widths))):
            for j in range(layers_per_block + 1):
                self.dec[f"l{i}_block{j}"] = ResBlock(c + skips.pop(), w, c0, norm_groups)
                c = w
            if i > 0:
                self.dec[f"l{i}_up"] = nn.Sequential(
                    nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1)
                )
        self.out_norm = nn.GroupNorm(norm_groups, c0, eps=1e-6)
        self.out_channels = image_channels + extra_out_channels
        self.out_conv = _zero_(nn.Conv2d(c0, self.out_channels, 3, padding=1))  # prediction starts at 0
        self.latent_skip = _zero_(nn.Conv2d(latent_channels, image_channels, 1)) if latent_skip else None

        # Implementation switch, not part of the model (same function either way, see tests/test_decoder.py):
        # run the conv levels channels-last (oneDNN / cuDNN convolutions are about 2x faster so on the CPU).
        # False: the reference NCHW path.
        self.channels_last = True
        # Lean inference (ResBlock.lean): without autograd (CPU, eager, channels-last, no autocast), the blocks
        # on maps of at least `lean_min_pixels` pixels run in row stripes of `stripe_rows` rows, and an up conv
        # feeding one is computed inside it; None: never.
        self.lean_min_pixels: int | None = LEAN_MIN_PIXELS
        self.stripe_rows = STRIPE_ROWS

    def _check(self, x_t, z, t, return_tokens_at):
        if x_t.ndim != 4 or x_t.shape[1] != self.image_channels:
            raise ValueError(f"x_t must be (B, {self.image_channels}, H, W), got {tuple(x_t.shape)}")
        B, _, H, W = x_t.shape
        if H % 8 or W % 8:
            raise ValueError(
                f"image size {H}x{W} must be a multiple of 8 (the transformer runs at 1/8 resolution)"
            )
        if z.ndim != 4 or z.shape[0] != B or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z must be ({B}, {self.latent_channels}, h, w) for x_t {tuple(x_t.shape)}, got "
                f"{tuple(z.shape)}"
            )
        h, w = z.shape[-2:]
        if H % h or W % w or (H // h) % 8 or (W // w) % 8:
            raise ValueError(
                f"z grid {h}x{w} must divide the image {H}x{W} with a factor f that is a multiple of 8 "
                f"(f = 8..128), got f = {H / h:g} x {W / w:g}"
            )
        if self.time_conditioned and t is None:
            raise ValueError("this decoder is time-conditioned (flow matching): pass t, shape (B,) in [0, 1]")
        if not self.time_conditioned and t is not None:
            raise ValueError(
                "this decoder has no time conditioning (time_conditioned=False, e.g. EqM): t must be None"
            )
        if t is not None and t.numel() not in (1, B):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        if return_tokens_at is not None and not 0 <= return_tokens_at < self.mid_depth:
            raise ValueError(f"return_tokens_at must be in [0, {self.mid_depth - 1}], got {return_tokens_at}")

    # Noisy image and z (projected, nearest-upsampled) concatenated, then a 3x3 conv: (B, C0, H, W).
    def _input_head(self, x_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z_img = F.interpolate(self.z_in(z), size=x_t.shape[-2:], mode="nearest")  # (B, C0/2, H, W)
        return self.conv_in(torch.cat([self.x_in(x_t), z_img], dim=1))

    def forward(
        self,
        x_t: torch.Tensor,
        z: torch.Tensor,
        t: torch.Tensor | None = None,
        return_tokens_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """pred (B, out_channels, H, W), or (pred, tokens (B, N, D)) after mid block `return_tokens_at` (0-based)."""
        self._check(x_t, z, t, return_tokens_at)
        if self.channels_last:
            x_t, z = (a.contiguous(memory_format=torch.channels_last) for a in (x_t, z))
        ctx = self.ctx(z)  # (B, C0, h, w)
        if self.time_conditioned:
            t = t.reshape(-1).expand(x_t.shape[0])  # (B,)
            ctx = ctx + self.time_mlp(_timestep_embedding(t, ctx.shape[1]).to(ctx.dtype))[:, :, None, None]
        ctx = F.silu(ctx)
        h = self._input_head(x_t, z)  # (B, C0, H, W)
        lean = (
            x_t.device.type == "cpu"  # stripes are many small kernels: not measured on a GPU
            and self.channels_last
            and self.lean_min_pixels is not None
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x_t.device.type)
        )

        def large(m):  # whether the blocks on this map's grid run lean
            return lean and m.shape[-2] * m.shape[-1] >= self.lean_min_pixels

        # lean at half resolution too: the input head's output is computed again for the last block, not held
        # through every level (at full resolution only, holding it is cheaper than the extra conv)
        skips = [None if large(h[:, :, ::2, ::2]) else h]
        for block in self.enc.values():
            if isinstance(block, ResBlock):
                h = _lean(block, [h], ctx, self.stripe_rows) if large(h) else block(h, ctx)
            else:
                h = block(h)
            skips.append(h)
        h, tokens = self.mid(h, ctx, return_tokens_at)  # (B, D, H/8, W/8)
        up = None  # an up conv left for the next (lean) block to compute
        for block in self.dec.values():
            if isinstance(block, ResBlock) and (skips[-1] is None or large(skips[-1])):
                skip = skips.pop()
                parts, h = [h, self._input_head(x_t, z) if skip is None else skip], None
                del skip  # the block empties `parts`: each map is freed once read
                h = _lean(block, parts, ctx, self.stripe_rows, up=up, reuse=parts[-1])
                up = None
            elif isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), ctx)
            elif large(skips[-1]):  # an up conv feeding a lean block: computed by that block, in stripes
                up = block  # h stays the low-resolution map
            else:
                h = block(h)
        norm = self.out_norm
        h = _group_norm(h, norm.num_groups, norm.eps, norm.weight, norm.bias)
        pred = self.out_conv(F.silu(h)).contiguous()  # (B, out_channels, H, W), NCHW
        if self.latent_skip is not None:
            low = F.interpolate(self.latent_skip(z), size=x_t.shape[-2:], mode="bilinear", align_corners=False)
            pred = torch.cat([pred[:, : self.image_channels] + low, pred[:, self.image_channels:]], 1).contiguous()
        return pred if return_tokens_at is None else (pred, tokens)


# ----------------------------------------------------------------------------------------------------
# Presets: SSDD's UViTDecoder sizes (channels, ch_mult, middle depth); `tiny` is for tests only.

DECODERS: dict[str, dict] = {
    "tiny": {
        "channels": 16,
        "channel_mult": (1, 1, 2, 2),
        "layers_per_block": 1,
        "mid_depth": 2,
        "mid_heads": 2,
        "norm_groups": 8,
    },
    "XS": {"channels": 32, "channel_mult": (1, 2, 3, 3), "mid_depth": 8, "mid_heads": 4},
    "S": {"channels": 48, "channel_mult": (1, 2, 3, 3), "mid_depth": 8, "mid_heads": 4},
    "B": {"channels": 64, "channel_mult": (1, 2, 3, 3), "mid_depth": 10},
    "M": {"channels": 96, "channel_mult": (1, 2, 3, 3), "mid_depth": 12},
    "L": {"channels": 96, "channel_mult": (1, 2, 4, 4), "mid_depth": 16},
    "XL": {"channels": 128, "channel_mult": (1, 2, 4, 4), "mid_depth": 16},
    "H": {"channels": 192, "channel_mult": (1, 2, 4, 4), "mid_depth": 16},
}


def build_decoder(name: str, latent_channels: int, **overrides) -> UViTDecoder:
    """Build a preset decoder (`DECODERS`), e.g. build_decoder("S", 32, time_conditioned=True)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    return UViTDecoder(latent_channels=latent_channels, **{**DECODERS[name], **overrides})
