"""The LDM / SD-VAE KL-f8 convolutional encoder (`vq_f8c4` in the registry).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022), autoencoder of Sec. 3.1 /
Appendix G: GroupNorm ResNet levels (128-256-512-512 channels, 2 ResNet blocks per level, x2 downsampling between
levels), a middle block with one full self-attention layer, then GroupNorm-SiLU-conv to 2c channels (mean, logvar)
and the 1x1 `quant_conv`. This is the SSDD paper's f8c4 baseline encoder (called "vq_f8c4" in the DC-SSDAE code).
Pretrained weights: a diffusers `AutoencoderKL` (encoder + quant_conv) or an LDM/SD checkpoint, through
`encoders/weights.py`.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dcssdae.encoders.dc_ae import Stage
from dcssdae.encoders.posterior import Posterior, check_image

# ----------------------------------------------------------------------------------------------------------------
# ResNet block (LDM `ResnetBlock`, no time embedding): GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1
# skip projection when the width changes.


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # Init: PyTorch defaults, as the LDM autoencoder (GroupNorm keeps every block's input at unit scale).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


# ----------------------------------------------------------------------------------------------------------------
# Single-head full self-attention over the H*W positions (LDM `AttnBlock`), residual.


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, N, C) each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, N, C), softmax(q k^T / sqrt(C)) v
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# x2 downsample (LDM `Downsample`, with_conv): pad right/bottom by one, conv3x3 stride 2.


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------
# Middle block (LDM `mid`): ResNet block -> self-attention -> ResNet block, at the last level's width.


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, groups)
        self.attn = SelfAttention(channels, groups) if attention else None
        self.block2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x)


# ----------------------------------------------------------------------------------------------------------------
# The KL-f8 encoder: conv_in -> levels (stages) -> mid -> GN/SiLU/conv_out (2c) -> quant_conv (1x1) -> (mean, logvar).


class KLEncoder(nn.Module):
    """LDM KL autoencoder encoder: image (B, 3, H, W) in [-1, 1] -> `Posterior` over z (B, c, H/f, W/f)."""

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        mid_attention: bool = True,
        double_latent: bool = True,
    ):
        """
        Args:
            in_channels: image channels.
            latent_channels: c, channels of z.
            channels: width of the first level.
            channel_mult: width multiplier per level; f = 2^(len(channel_mult) - 1).
            num_res_blocks: ResNet blocks per level.
            norm_groups: GroupNorm groups (every width must be divisible by it).
            mid_attention: self-attention in the middle block (LDM/SD: True).
            double_latent: Gaussian posterior. False keeps the same layers (pretrained weights still load) but
                returns a deterministic latent (the mean, logvar None).
        """
        super().__init__()
        widths = [channels * m for m in channel_mult]
        bad = [w for w in [channels, *widths] if w % norm_groups]
        if bad:
            raise ValueError(f"KLEncoder: channels {channels} and widths {widths} must be divisible by "
                             f"norm_groups={norm_groups} (got {bad})")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.double_latent = double_latent
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        # The resolution levels are `encoder.Stage`s: ResNet blocks (the first one changes the width), then a x2
        # downsample except in the last level.
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.stages = nn.ModuleList()
        for s, (w_in, width) in enumerate(zip([channels, *widths[:-1]], widths)):
            blocks = [ResnetBlock(w_in if j == 0 else width, width, norm_groups) for j in range(num_res_blocks)]
            self.stages.append(Stage(blocks, Downsample(width) if s < len(widths) - 1 else None))
        self.mid = MidBlock(widths[-1], norm_groups, mid_attention)
        self.norm_out = nn.GroupNorm(norm_groups, widths[-1], 1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        # Gradient checkpointing of the middle block (the stages' blocks: `Stage`), off by default; diffusers'
        # attribute names (its `enable_gradient_checkpointing` sets them).
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> Posterior:
        check_image(x, self.in_channels, self.downsample_factor, type(self).__name__)
        h = self.conv_in(x)  # (B, channels, H, W)
        for stage in self.stages:
            h = stage(h)  # (B, widths[-1], H/f, W/f) after the last level
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = self._gradient_checkpointing_func(self.mid, h)
        else:
            h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2c, H/f, W/f)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return Posterior(mean, logvar if self.double_latent else None)
