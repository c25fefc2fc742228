"""Encoders by name: the registry of named variants (`ENCODERS`) and `build_encoder(name, pretrained=None,
**overrides)`.

The networks live in their own files: the DC-AE encoder in `encoders/dc_ae.py` (Chen, Cai et al., ICLR 2025), the LDM /
SD-VAE KL-f8 encoder (`vq_f8c4`) in `encoders/kl_f8.py`; both return a `Posterior` (`encoders/posterior.py`). Pretrained weights
load through `encoders/weights.py`. Imports flow one way: posterior <- dc_ae <- kl_f8 <- weights <-
this registry; the names below are re-exported so that `from dcssdae.encoders import Posterior, DCEncoder, ...` works.
"""

import inspect
from collections.abc import Sequence

from torch import nn

from dcssdae.encoders.dc_ae import (  # noqa: F401 (re-exported)
    BLOCK_TYPES,
    DCEncoder,
    Downsample,
    EfficientViTBlock,
    GLUMBConv,
    LiteMLA,
    ResBlock,
    RMSNorm2d,
    Stage,
    space_to_channel_average,
)
from dcssdae.encoders.kl_f8 import KLEncoder
from dcssdae.encoders.posterior import Posterior, check_image  # noqa: F401 (re-exported)
from dcssdae.encoders.weights import load_encoder_weights

# ----------------------------------------------------------------------------------------------------------------
# Registry of named variants. "arch" picks the class; every other entry is a constructor argument.

_RES, _EVIT = ("ResBlock",), ("EViT",)
_DC10 = _RES * 3

ENCODERS: dict[str, dict] = {
    # DC-AE 1.0 (efficientvit `dc_ae.py`, diffusers `AutoencoderDC`): deterministic, averaging out-shortcut.
    "dc-ae-f32c32-in-1.0": {
        "arch": "dc", "latent_channels": 32, "widths": (128, 256, 512, 512, 1024, 1024),
        "depths": (0, 4, 8, 2, 2, 2), "block_types": _DC10 + _EVIT * 3, "out_shortcut": True, "double_latent": False},
    "dc-ae-f64c128-in-1.0": {
        "arch": "dc", "latent_channels": 128, "widths": (128, 256, 512, 512, 1024, 1024, 2048),
        "depths": (0, 4, 8, 2, 2, 2, 2), "block_types": _DC10 + _EVIT * 4, "out_shortcut": True,
        "double_latent": False},
    "dc-ae-f128c512-in-1.0": {
        "arch": "dc", "latent_channels": 512, "widths": (128, 256, 512, 512, 1024, 1024, 2048, 2048),
        "depths": (0, 4, 8, 2, 2, 2, 2, 2), "block_types": _DC10 + _EVIT * 5, "out_shortcut": True,
        "double_latent": False},
    # DC-AE 1.1/1.5-style all-ResBlock encoders (DC-Gen `dc_ae.py`): no out-shortcut; Gaussian posterior, as in
    # DC-SSDAE (trained from scratch with a KL term).
    "dc-ae-1.5-f32c32": {
        "arch": "dc", "latent_channels": 32, "widths": (128, 256, 512, 512, 1024, 1024),
        "depths": (0, 5, 10, 4, 4, 4), "block_types": _RES * 6, "out_shortcut": False, "double_latent": True},
    "dc-ae-1.5-f64c128": {
        "arch": "dc", "latent_channels": 128, "widths": (128, 256, 512, 512, 1024, 1024, 1024),
        "depths": (0, 5, 10, 4, 4, 4, 4), "block_types": _RES * 7, "out_shortcut": False, "double_latent": True},
    "dc-ae-1.5-f128c512": {
        "arch": "dc", "latent_channels": 512, "widths": (128, 256, 512, 512, 1024, 1024, 1024, 1024),
        "depths": (0, 5, 10, 4, 4, 4, 4, 4), "block_types": _RES * 8, "out_shortcut": False, "double_latent": True},
    # Tiny presets for tests (the same code paths, both block types).
    "tiny-f32c8": {
        "arch": "dc", "latent_channels": 8, "widths": (16, 16, 32, 32, 32, 32), "depths": (0, 1, 1, 1, 1, 1),
        "block_types": _RES * 3 + _EVIT * 3, "attention_head_dim": 8, "out_shortcut": True, "double_latent": True},
    "tiny-f8c4": {
        "arch": "dc", "latent_channels": 4, "widths": (16, 16, 32, 32), "depths": (0, 1, 1, 1),
        "block_types": _RES * 2 + _EVIT * 2, "attention_head_dim": 8, "out_shortcut": True, "double_latent": True},
    # LDM / SD-VAE KL-f8 encoder (Rombach et al. 2022), see encoder_kl.py.
    "vq_f8c4": {
        "arch": "kl", "latent_channels": 4, "channels": 128, "channel_mult": (1, 2, 4, 4), "num_res_blocks": 2,
        "norm_groups": 32},
    "tiny-vq_f8c4": {
        "arch": "kl", "latent_channels": 4, "channels": 16, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1,
        "norm_groups": 8},
}


def encoder_class(arch: str) -> type[nn.Module]:
    if arch == "dc":
        return DCEncoder
    if arch == "kl":
        return KLEncoder
    raise ValueError(f"unknown encoder arch {arch!r}; known: 'dc', 'kl'")


def build_encoder(name: str, pretrained: str | None = None, **overrides) -> nn.Module:
    """Build the named encoder variant (see `ENCODERS`), optionally with pretrained weights.

    Args:
        name: a key of `ENCODERS`.
        pretrained: a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`/`.bin`), an original
            MIT DC-AE file (`model.safetensors`, `.pt`/`.pth`), an LDM/SD-VAE file, or a file saved from this
            encoder. See `encoder_weights.load_encoder_weights`.
        overrides: constructor arguments that replace the preset's (e.g. `double_latent=True`).
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    config = dict(ENCODERS[name])
    cls = encoder_class(config.pop("arch"))
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"build_encoder({name!r}): unknown override(s) {unknown}; {cls.__name__} takes {allowed}")
    config.update(overrides)
    for key in ("widths", "depths", "block_types", "channel_mult"):
        if key in config and isinstance(config[key], Sequence) and not isinstance(config[key], str):
            config[key] = tuple(config[key])
    encoder = cls(**config)
    encoder.name = name
    if pretrained is not None:
        load_encoder_weights(encoder, pretrained)
    return encoder
