"""The DC-AE encoder network and its blocks.

Chen, Cai et al., "Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models" (ICLR 2025):
residual autoencoding, where every space-to-channel step adds a parameter-free shortcut (pixel unshuffle, then
averaging groups of channels) to a learned path, so the network only learns a residual. The blocks are ResBlocks in
the high-resolution stages and EfficientViT blocks (ReLU linear attention + GLU MBConv; Cai et al., "EfficientViT:
Multi-Scale Linear Attention for High-Resolution Dense Prediction", ICCV 2023) in the low-resolution ones. Module
names are our own; `encoders/weights.py` maps the diffusers `AutoencoderDC` and the original MIT (efficientvit)
checkpoints onto them. Build it by name with `dcssdae.encoders.build_encoder`.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcssdae.encoders.posterior import Posterior, check_image

# ----------------------------------------------------------------------------------------------------------------
# RMSNorm over the channel axis (Zhang & Sennrich 2019, Eq. 4) with a learned gain *and* bias, as DC-AE's
# `trms2d`. Pure PyTorch (runs on CPU); statistics in float32.


class RMSNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))  # unit gain: every residual branch starts at unit RMS
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)
        y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Non-parametric space-to-channel shortcut (DC-AE Sec. 3.2, Fig. 4b): pixel-unshuffle by `factor`, then average
# groups of consecutive channels down to `out_channels`. factor=1 is the channel-averaging output shortcut.


def space_to_channel_average(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    if factor > 1:
        x = F.pixel_unshuffle(x, factor)  # (B, C*f*f, H/f, W/f), channel index = c*f*f + i*f + j
    return x.unflatten(1, (out_channels, -1)).mean(dim=2)


# ----------------------------------------------------------------------------------------------------------------
# ResBlock (DC-AE, ResBlock stages): conv3x3 (bias) -> SiLU -> conv3x3 (no bias) -> RMSNorm, identity residual.


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNorm2d(channels, norm_eps)
        # Init: He-normal for the conv that feeds SiLU, zero bias; conv2's scale is removed by the RMSNorm, whose unit
        # gain makes the branch add an O(1) residual at init (nothing zero-initialised, so every weight gets a gradient).
        nn.init.kaiming_normal_(self.conv1.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv1.bias)
        nn.init.kaiming_normal_(self.conv2.weight, nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


# ----------------------------------------------------------------------------------------------------------------
# LiteMLA: ReLU linear attention (EfficientViT, Cai et al. ICCV 2023, Eq. 2-3), single scale as in DC-AE 1.0:
#   out_n = sum_m v_m relu(k_m)^T relu(q_n) / (sum_m relu(k_m)^T relu(q_n) + eps),
# computed as (V K^T) Q in O(N d^2) when N > d, else as V (K^T Q) in O(N^2 d). Always float32 with autocast off.


class LiteMLA(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32, norm_eps: float = 1e-5, eps: float = 1e-15):
        super().__init__()
        self.head_dim = head_dim
        self.heads = channels // head_dim
        self.eps = eps
        # One 1x1 conv makes q, k, v; its output channels are laid out head by head as [q_h | k_h | v_h] (DC-AE order).
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels, norm_eps)
        # Init: the attention is invariant to the scale of q and k; v's scale is removed by the RMSNorm after proj.
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.xavier_uniform_(self.proj.weight)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        B, _, H, W = qkv.shape
        qkv = qkv.float().reshape(B, self.heads, 3 * self.head_dim, H * W)  # (B, h, 3d, N)
        q, k, v = qkv.split(self.head_dim, dim=2)  # (B, h, d, N) each
        q, k = F.relu(q), F.relu(k)
        if H * W > self.head_dim:
            vk = v @ k.transpose(-1, -2)  # (B, h, d, d)
            numerator = vk @ q  # (B, h, d, N)
            denominator = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q  # (B, h, 1, N)
            out = numerator / (denominator + self.eps)
        else:
            scores = k.transpose(-1, -2) @ q  # (B, h, N_k, N_q)
            scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
            out = v @ scores  # (B, h, d, N)
        return out.reshape(B, -1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.attention(qkv)
        return self.norm(self.proj(out.to(qkv.dtype)))  # back to the conv dtype (bf16 under autocast)


# ----------------------------------------------------------------------------------------------------------------
# GLUMBConv (DC-AE / SANA): 1x1 expand to 2 x (ratio*C) -> SiLU -> depthwise 3x3 -> split -> x * SiLU(gate)
# -> 1x1 project (no bias) -> RMSNorm.


class GLUMBConv(nn.Module):
    def __init__(self, channels: int, expand_ratio: float = 4.0, norm_eps: float = 1e-5):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels, norm_eps)
        # Init: He-normal before the SiLUs, zero biases; the output scale is set by the RMSNorm.
        nn.init.kaiming_normal_(self.inverted.weight, nonlinearity="relu")
        nn.init.zeros_(self.inverted.bias)
        nn.init.kaiming_normal_(self.depthwise.weight, nonlinearity="linear")
        nn.init.zeros_(self.depthwise.bias)
        nn.init.kaiming_normal_(self.point.weight, nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(F.silu(self.inverted(x)))
        h, gate = h.chunk(2, dim=1)
        return self.norm(self.point(h * F.silu(gate)))


# ----------------------------------------------------------------------------------------------------------------
# EfficientViT block (DC-AE `EViT_GLU`): x + LiteMLA(x), then + GLUMBConv(.).


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32, expand_ratio: float = 4.0, norm_eps: float = 1e-5):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, norm_eps)
        self.mlp = GLUMBConv(channels, expand_ratio, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


# ----------------------------------------------------------------------------------------------------------------
# Residual downsample (DC-AE Fig. 4b): conv3x3 to C_out/4, pixel-unshuffle x2 -> C_out, plus (optionally) the
# parameter-free space-to-channel averaging shortcut.


class Downsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True):
        super().__init__()
        self.out_channels = out_channels
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)
        # Init: PyTorch's default conv init (variance gain 1/3) with zero bias: the learned path starts smaller than
        # the shortcut, which carries the signal; no zero init, so the path is trainable from step 0.
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_unshuffle(self.conv(x), 2)
        if self.shortcut:
            y = y + space_to_channel_average(x, self.out_channels, 2)
        return y


# ----------------------------------------------------------------------------------------------------------------
# One stage (a resolution level): blocks, then (except in the last stage) a x2 downsample. Shared by DCEncoder
# (DC-AE Fig. 4: blocks at constant width, residual downsample) and encoder_kl.KLEncoder (LDM levels).


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], down: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.down = down
        # Gradient (activation) checkpointing of each block, off by default (diffusers' attribute names: its
        # `enable_gradient_checkpointing` sets them): the block's activations are recomputed in backward.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = self._gradient_checkpointing_func(block, x)
        else:
            x = self.blocks(x)
        return x if self.down is None else self.down(x)


# ----------------------------------------------------------------------------------------------------------------
# The DC-AE encoder (DC-AE Sec. 3.2): project_in -> stages -> project_out (+ channel-averaging shortcut).

BLOCK_TYPES = ("ResBlock", "EViT")


class DCEncoder(nn.Module):
    """DC-AE encoder: image (B, in_channels, H, W) in [-1, 1] -> `Posterior` over z of shape (B, c, H/f, W/f)."""

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 32,
        widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024),
        depths: tuple[int, ...] = (0, 4, 8, 2, 2, 2),
        block_types: tuple[str, ...] = ("ResBlock", "ResBlock", "ResBlock", "EViT", "EViT", "EViT"),
        attention_head_dim: int = 32,
        mlp_ratio: float = 4.0,
        down_shortcut: bool = True,
        out_shortcut: bool = True,
        double_latent: bool = False,
        norm_eps: float = 1e-5,
    ):
        """
        Args:
            in_channels: image channels.
            latent_channels: c, channels of z.
            widths: channels of each stage.
            depths: blocks per stage. depths[0] may be 0 (then project_in downsamples x2 into widths[1], as in
                DC-AE 1.0); every later stage needs at least one block.
            block_types: "ResBlock" or "EViT" (EfficientViT: LiteMLA + GLUMBConv) per stage.
            attention_head_dim: channels per LiteMLA head (32 in DC-AE).
            mlp_ratio: GLUMBConv expansion ratio (4 in DC-AE).
            down_shortcut: add the space-to-channel averaging shortcut to every stage downsample (DC-AE: True).
            out_shortcut: add the channel-averaging shortcut to the mean of the output projection (DC-AE 1.0: True,
                DC-AE 1.1/1.5: False). It needs widths[-1] divisible by latent_channels.
            double_latent: Gaussian posterior (a second 3x3 conv head predicts log-variance) for KL training;
                False gives a deterministic latent (logvar None).
            norm_eps: RMSNorm epsilon.
        """
        super().__init__()
        widths, depths, block_types = tuple(widths), tuple(depths), tuple(block_types)
        self._check_config(in_channels, latent_channels, widths, depths, block_types, attention_head_dim,
                           out_shortcut)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.double_latent = double_latent
        self.out_shortcut = out_shortcut

        # Stage 0 with depth 0 (DC-AE 1.0): project_in = conv3x3 to widths[1]/4 + pixel-unshuffle x2, no shortcut.
        if depths[0] == 0:
            self.project_in = Downsample(in_channels, widths[1], shortcut=False)
        else:
            self.project_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        downs = int(depths[0] == 0)

        self.stages = nn.ModuleList()
        for s, (width, depth, kind) in enumerate(zip(widths, depths, block_types)):
            if kind == "ResBlock":
                blocks = [ResBlock(width, norm_eps) for _ in range(depth)]
            else:
                blocks = [EfficientViTBlock(width, attention_head_dim, mlp_ratio, norm_eps) for _ in range(depth)]
            down = None
            if s < len(widths) - 1 and depth > 0:
                down = Downsample(width, widths[s + 1], shortcut=down_shortcut)
                downs += 1
            self.stages.append(Stage(blocks, down))
        self.downsample_factor = 2**downs

        # Output projection: mean head (+ channel-averaging shortcut) and, for a Gaussian posterior, a logvar head.
        self.project_out = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)
        self.project_logvar = nn.Conv2d(widths[-1], latent_channels, 3, padding=1) if double_latent else None
        # Init: default conv weights, zero biases. The logvar head's weights are scaled by 0.1 so every element
        # starts at logvar ~ 0 (unit std, the prior's, as in the LDM KL-VAE) instead of spreading with the feature
        # scale; `encoder_weights` sets it to a constant when loading a deterministic checkpoint.
        nn.init.zeros_(self.project_out.bias)
        if self.project_logvar is not None:
            with torch.no_grad():
                self.project_logvar.weight.mul_(0.1)
            nn.init.zeros_(self.project_logvar.bias)

    @staticmethod
    def _check_config(in_channels, latent_channels, widths, depths, block_types, head_dim, out_shortcut):
        n = len(widths)
        if n < 2 or len(depths) != n or len(block_types) != n:
            raise ValueError(f"DCEncoder: widths {widths}, depths {depths} and block_types {block_types} must have "
                             "the same length (>= 2)")
        if any(d < 1 for d in depths[1:]) or depths[0] < 0:
            raise ValueError(f"DCEncoder: depths {depths}: only the first stage may have depth 0")
        unknown = [b for b in block_types if b not in BLOCK_TYPES]
        if unknown:
            raise ValueError(f"DCEncoder: unknown block types {unknown}; known: {BLOCK_TYPES}")
        for w, b in zip(widths, block_types):
            if b == "EViT" and w % head_dim:
                raise ValueError(f"DCEncoder: EViT width {w} is not divisible by attention_head_dim {head_dim}")
        first = widths[0] if depths[0] > 0 else widths[1]
        if depths[0] == 0 and first % 4:
            raise ValueError(f"DCEncoder: project_in width {first} must be divisible by 4 (pixel-unshuffle)")
        for s in range(1 if depths[0] == 0 else 0, n - 1):
            w_in, w_out = widths[s], widths[s + 1]
            if w_out % 4 or (4 * w_in) % w_out:
                raise ValueError(f"DCEncoder: downsample {w_in} -> {w_out} needs C_out divisible by 4 and 4*C_in "
                                 "divisible by C_out (space-to-channel averaging)")
        if out_shortcut and widths[-1] % latent_channels:
            raise ValueError(f"DCEncoder: out_shortcut needs widths[-1]={widths[-1]} divisible by latent_channels="
                             f"{latent_channels}")
        if in_channels < 1 or latent_channels < 1:
            raise ValueError(f"DCEncoder: in_channels={in_channels}, latent_channels={latent_channels} must be >= 1")

    def forward(self, x: torch.Tensor) -> Posterior:
        check_image(x, self.in_channels, self.downsample_factor, type(self).__name__)
        h = self.project_in(x)  # (B, widths[1], H/2, W/2) for depths[0] == 0
        for stage in self.stages:
            h = stage(h)  # (B, widths[-1], H/f, W/f) after the last stage
        mean = self.project_out(h)  # (B, c, H/f, W/f)
        if self.out_shortcut:
            mean = mean + space_to_channel_average(h, self.latent_channels, 1)
        logvar = None if self.project_logvar is None else self.project_logvar(h)
        return Posterior(mean, logvar)
