"""The layers of the SSDD U-ViT decoder (`decoder.py` assembles them): adaptive normalisation (AdaGN, AdaLN),
windowed self-attention with a learned relative position bias and its three backends, the GEGLU feed-forward, and the
small tensor helpers they share (modulation of maps and tokens by a coarser conditioning grid, cached index tensors).

Vallaeys, Verbeek, Cord, "SSDD: Single-Step Diffusion Decoder for Efficient Image Tokenization" (2025), Sec. 3.1.
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
