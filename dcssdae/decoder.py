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
    batch), on CUDA FlexAttention skips the masked blocks. The dense "sdpa" backend ((1, heads, N, N), shared
    by the batch) is kept as the reference.
  * Speed without changing the function: the conv levels run channels-last, and without autograd the AdaGN
    modulation and the SiLU overwrite the norm's output (tests/test_decoder.py compares every fast path with
    the reference path, values and gradients).
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
# nearest-upsampled by broadcasting (no upsampled copy is materialised). Maps: x (B, C, H, W), scale/shift (B,
# C, h, w), H = h * rh. A channels-last x is modulated through a channels-innermost view (one contiguous pass,
# and the result stays channels-last); `inplace` writes the result into x (inference: x is a fresh norm output).
def _modulate_map(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    B, C, H, W = x.shape
    h, w = scale.shape[-2:]
    if _is_channels_last(x):
        x6 = x.permute(0, 2, 3, 1).view(B, h, H // h, w, W // w, C)
        scale, shift = (m.permute(0, 2, 3, 1)[:, :, None, :, None] for m in (scale, shift))  # (B, h, 1, w, 1, C)
        out = torch.addcmul(shift, x6, 1 + scale, out=x6 if inplace else None)
        return out.reshape(B, H, W, C).permute(0, 3, 1, 2)  # a view (reshape: the compiler's stride guesses)
    x6 = x.view(B, C, h, H // h, w, W // w)
    scale, shift = scale[:, :, :, None, :, None], shift[:, :, :, None, :, None]
    return torch.addcmul(shift, x6, 1 + scale, out=x6 if inplace else None).reshape(B, C, H, W)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Same for tokens: x (B, N, D) on a row-major (Hg, Wg) grid, scale/shift (B, h, w, D).
def _modulate_tokens(
    x: torch.Tensor, grid: tuple[int, int], scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    B, N, D = x.shape
    (Hg, Wg), (h, w) = grid, scale.shape[1:3]
    x = x.view(B, h, Hg // h, w, Wg // w, D)
    return torch.addcmul(shift[:, :, None, :, None], x, 1 + scale[:, :, None, :, None]).view(B, N, D)


# Index of the relative offset (key - query) along one axis of length n into a window table padded by one
# entry on each side: offsets -r..r map to 1..2r+1, every offset outside the window maps to the border (0 or
# 2r+2). Only these small integer tensors are cached (keyed by size), never parameter values; under
# torch.compile the index is traced into the graph instead (a constant there). Cached tensors are built outside
# inference mode: one first built under torch.inference_mode (validation) could not be saved for backward later.
def _offset_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        return _cached_offset_index(n, radius, device)
    pos = torch.arange(n, device=device)
    return (pos[None, :] - pos[:, None] + radius + 1).clamp(0, 2 * radius + 2)  # (n, n)


@functools.lru_cache(maxsize=32)
def _cached_offset_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        pos = torch.arange(n, device=device)
        return (pos[None, :] - pos[:, None] + radius + 1).clamp(0, 2 * radius + 2)


# FlexAttention block mask of the window |dy| <= r and |dx| <= r (depends on the grid only, cached; built
# outside any torch.compile graph).
@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def _window_block_mask(Hg: int, Wg: int, radius: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        dy, dx = kv_idx // Wg - q_idx // Wg, kv_idx % Wg - q_idx % Wg
        return (dy.abs() <= radius) & (dx.abs() <= radius)

    with torch.inference_mode(False):  # cached: see _cached_offset_index
        return create_block_mask(in_window, B=None, H=None, Q_LEN=Hg * Wg, KV_LEN=Hg * Wg, device=device)


# Tiling of the token grid for the blocked window attention: query tiles of t x t tokens, each attending to
# the (t + 2r) x (t + 2r) keys around it (a halo of r per side). Returns (integers and booleans only, never
# parameter values; cached per grid like _offset_index):
#   offset (t^2, K^2): index of each (query, key) pair of a tile into the window table padded by one -inf entry
#       per side (flattened, side 2r + 3); pairs outside the window index the border. The same for every tile.
#   valid (T, K^2): whether each key of each tile lies on the grid (keys in the halo past the edge are padding).
def _window_tiles(Hg: int, Wg: int, radius: int, tile: int, device: torch.device):
    if not torch.compiler.is_compiling():
        return _cached_window_tiles(Hg, Wg, radius, tile, device)
    return _build_window_tiles(Hg, Wg, radius, tile, device)


def _build_window_tiles(Hg: int, Wg: int, radius: int, tile: int, device: torch.device):
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


@functools.lru_cache(maxsize=32)
def _cached_window_tiles(Hg: int, Wg: int, radius: int, tile: int, device: torch.device):
    with torch.inference_mode(False):
        return _build_window_tiles(Hg, Wg, radius, tile, device)


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
        # since t <= r + 1, so no softmax row is empty. Memory: (T * heads, t^2, K^2) scores, not N^2.
        (Hg, Wg), r, (B, heads, N, d) = grid, self.radius, q.shape
        t = min(TILE, r + 1)
        nty, ntx, Ks = -(-Hg // t), -(-Wg // t), t + 2 * r
        Hp, Wp, T = nty * t, ntx * t, nty * ntx
        offset, valid = _window_tiles(Hg, Wg, r, t, q.device)
        table = F.pad(self.rel_bias, (1, 1, 1, 1), value=float("-inf")).flatten(1)  # (heads, (2r + 3)^2)
        bias = table[:, offset].to(q.dtype).masked_fill(~valid[:, None, None, :], float("-inf"))  # (T, heads,
        # t^2, K^2); tiles are folded into the head axis so that the bias broadcasts over the batch
        q = F.pad(q.view(B, heads, Hg, Wg, d), (0, 0, 0, Wp - Wg, 0, Hp - Hg))
        q = q.view(B, heads, nty, t, ntx, t, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(B, T * heads, t * t, d)

        def halo(x):  # (B, heads, N, d) -> (B, T * heads, K^2, d): the keys (values) around each tile
            x = F.pad(x.view(B, heads, Hg, Wg, d), (0, 0, r, r + Wp - Wg, r, r + Hp - Hg))
            x = x.unfold(2, Ks, t).unfold(3, Ks, t)  # (B, heads, nty, ntx, d, Ks, Ks)
            return x.permute(0, 2, 3, 1, 5, 6, 4).reshape(B, T * heads, Ks * Ks, d)

        out = F.scaled_dot_product_attention(q, halo(k), halo(v), attn_mask=bias.view(1, T * heads, t * t, -1))
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
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


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
    ):
        """
        Args:
            latent_channels: channels c of z (B, c, H/f, W/f); f may be any multiple of 8 (8..128).
            image_channels: channels of x_t and of the prediction.
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
        self.out_conv = _zero_(nn.Conv2d(c0, image_channels, 3, padding=1))  # prediction starts at 0

        # Implementation switch, not part of the model (same function either way, see tests/test_decoder.py):
        # run the conv levels channels-last (oneDNN / cuDNN convolutions are about 2x faster so on the CPU).
        # False: the reference NCHW path.
        self.channels_last = True

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

    def forward(
        self,
        x_t: torch.Tensor,
        z: torch.Tensor,
        t: torch.Tensor | None = None,
        return_tokens_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """pred (shape of x_t), or (pred, tokens (B, N, D)) after mid block `return_tokens_at` (0-based)."""
        self._check(x_t, z, t, return_tokens_at)
        if self.channels_last:
            x_t, z = (a.contiguous(memory_format=torch.channels_last) for a in (x_t, z))
        ctx = self.ctx(z)  # (B, C0, h, w)
        if self.time_conditioned:
            t = t.reshape(-1).expand(x_t.shape[0])  # (B,)
            ctx = ctx + self.time_mlp(_timestep_embedding(t, ctx.shape[1]).to(ctx.dtype))[:, :, None, None]
        ctx = F.silu(ctx)
        z_img = F.interpolate(self.z_in(z), size=x_t.shape[-2:], mode="nearest")  # (B, C0/2, H, W)
        h = self.conv_in(torch.cat([self.x_in(x_t), z_img], dim=1))  # (B, C0, H, W)
        skips = [h]
        for block in self.enc.values():
            h = block(h, ctx) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        h, tokens = self.mid(h, ctx, return_tokens_at)  # (B, D, H/8, W/8)
        for block in self.dec.values():
            h = block(torch.cat([h, skips.pop()], dim=1), ctx) if isinstance(block, ResBlock) else block(h)
        norm = self.out_norm
        h = _group_norm(h, norm.num_groups, norm.eps, norm.weight, norm.bias)
        pred = self.out_conv(F.silu(h)).contiguous()  # (B, 3, H, W), NCHW
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
