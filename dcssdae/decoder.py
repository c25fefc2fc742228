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

import itertools
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcssdae.decoder_layers import (
    ATTENTION_BACKENDS,
    GEGLU,
    AdaGroupNorm,
    AdaLayerNorm,
    WindowAttention,
    _affine_map,
    _group_norm,
    _round_up,
    _timestep_embedding,
    _zero_,
)
from dcssdae.decoder_lean import LEAN_MIN_PIXELS, STRIPE_ROWS, _adagn_affine, _lean, _Moments, _part_rows


def _run(owner: nn.Module, block: nn.Module, *args):
    """block(*args), gradient-checkpointed (activations recomputed in backward) when `owner.gradient_checkpointing`
    is on and autograd records; diffusers' attribute names (its `enable_gradient_checkpointing` sets them)."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, *args)
    return block(*args)


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
        self.gradient_checkpointing = False  # per block, see _run
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, x, ctx, return_tokens_at=None):
        B, D, Hg, Wg = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, Hg * Wg, D))  # (B, N, D); a view if
        # x is channels-last
        ctx_tokens = ctx.permute(0, 2, 3, 1)  # (B, h, w, C0)
        tokens = None
        for i, block in enumerate(self.blocks):
            h = _run(self, block, h, (Hg, Wg), ctx_tokens)
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
        # Gradient checkpointing of each ResBlock (the middle transformer's blocks: its own flag), off by default.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

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
                h = _lean(block, [h], ctx, self.stripe_rows) if large(h) else _run(self, block, h, ctx)
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
                h = _run(self, block, torch.cat([h, skips.pop()], dim=1), ctx)
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
