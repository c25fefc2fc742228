"""Pretrained weights for the encoders: read a checkpoint, map its key names onto ours, check, load.

Formats understood (detected from the key names):
  DCEncoder  - diffusers `AutoencoderDC` (`encoder.conv_in.conv.weight`, `encoder.down_blocks.S.I...`),
             - original MIT DC-AE / efficientvit (`encoder.project_in.conv.conv.weight`, `encoder.stages.S.op_list.I...`;
               the `mit-han-lab/dc-ae-*` HF repos' `model.safetensors`, or a `.pt`/`.pth` holding `{"state_dict": ...}`),
             - our own names (a file saved from `DCEncoder.state_dict()`, with or without an `encoder.` prefix).
  KLEncoder  - diffusers `AutoencoderKL` (`encoder.down_blocks.L.resnets.J...` + top-level `quant_conv`),
             - LDM / Stable Diffusion (`encoder.down.L.block.J...`, optionally under `first_stage_model.` or `vae.`),
             - our own names.
Only encoder keys are used (decoder keys are dropped). Only safetensors or `torch.load(weights_only=True)`.

A deterministic checkpoint (DC-AE 1.0 has no log-variance) loaded into a Gaussian encoder (`double_latent=True`)
keeps its mean path unchanged, and the log-variance head is set to a constant: zero weight, bias `LOGVAR_FILL` =
-10 (std = e^-5 ~ 6.7e-3, far below the ~3.5 RMS of DC-AE latents), so sampling starts almost deterministic and
KL training can raise the variance where it pays.
"""

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

LOGVAR_FILL = -10.0

log = logging.getLogger(__name__)

# File names tried, in order, inside a folder (diffusers first, then the MIT HF repo, then single loose files).
_FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# ----------------------------------------------------------------------------------------------------------------
# Reading files.


def _resolve_file(path: Path) -> tuple[Path, dict | None]:
    """The weight file for `path` (a file, a diffusers model folder, or a pipeline folder with `vae/`) and its
    diffusers config.json (None if there is none)."""
    if not path.exists():
        raise FileNotFoundError(f"pretrained encoder weights not found: {path} (place a diffusers model folder with "
                                "config.json + diffusion_pytorch_model.safetensors, or a .safetensors/.pt file there)")
    if path.is_file():
        return path, None
    if not any((path / f).exists() for f in _FOLDER_FILES) and (path / "vae" / "config.json").exists():
        path = path / "vae"  # a Stable Diffusion pipeline folder
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    for name in _FOLDER_FILES:
        if (path / name).exists():
            return path / name, config
    loose = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
    if len(loose) == 1:
        return loose[0], config
    raise FileNotFoundError(f"no weight file in {path}: expected one of {_FOLDER_FILES} or a single file ending in "
                            f"{_SUFFIXES} (found {[p.name for p in loose]})")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """Tensors of a checkpoint (a `{"state_dict": ...}` wrapper is unwrapped), its config.json, and the file read."""
    file, config = _resolve_file(Path(path))
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors (or {{'state_dict': ...}})")
    return state, config, file


# ----------------------------------------------------------------------------------------------------------------
# Key mappings: ordered (regex, replacement) rules applied with re.fullmatch. A replacement ending in "#i" is part i
# of a tensor that is concatenated along dim 0 (q, k, v -> qkv).

_B = r"(weight|bias)"

DC_DIFFUSERS = [
    (rf"conv_in\.conv\.{_B}", r"project_in.conv.\1"),
    (rf"conv_in\.{_B}", r"project_in.\1"),
    (rf"down_blocks\.(\d+)\.(\d+)\.(conv1|conv2|norm)\.{_B}", r"stages.\1.blocks.\2.\3.\4"),
    (r"down_blocks\.(\d+)\.(\d+)\.attn\.to_q\.weight", r"stages.\1.blocks.\2.attn.qkv.weight#0"),
    (r"down_blocks\.(\d+)\.(\d+)\.attn\.to_k\.weight", r"stages.\1.blocks.\2.attn.qkv.weight#1"),
    (r"down_blocks\.(\d+)\.(\d+)\.attn\.to_v\.weight", r"stages.\1.blocks.\2.attn.qkv.weight#2"),
    (r"down_blocks\.(\d+)\.(\d+)\.attn\.to_out\.weight", r"stages.\1.blocks.\2.attn.proj.weight"),
    (rf"down_blocks\.(\d+)\.(\d+)\.attn\.norm_out\.{_B}", r"stages.\1.blocks.\2.attn.norm.\3"),
    (rf"down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_inverted\.{_B}", r"stages.\1.blocks.\2.mlp.inverted.\3"),
    (rf"down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_depth\.{_B}", r"stages.\1.blocks.\2.mlp.depthwise.\3"),
    (rf"down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_point\.{_B}", r"stages.\1.blocks.\2.mlp.point.\3"),
    (rf"down_blocks\.(\d+)\.(\d+)\.conv_out\.norm\.{_B}", r"stages.\1.blocks.\2.mlp.norm.\3"),
    (rf"down_blocks\.(\d+)\.(\d+)\.conv\.{_B}", r"stages.\1.down.conv.\3"),
    (rf"conv_out\.{_B}", r"project_out.\1"),
]

_OP = r"stages\.(\d+)\.op_list\.(\d+)"
DC_MIT = [
    (rf"project_in\.conv\.conv\.{_B}", r"project_in.conv.\1"),
    (rf"project_in\.conv\.{_B}", r"project_in.\1"),
    (rf"{_OP}\.main\.(conv1|conv2)\.conv\.{_B}", r"stages.\1.blocks.\2.\3.\4"),
    (rf"{_OP}\.main\.conv2\.norm\.{_B}", r"stages.\1.blocks.\2.norm.\3"),
    (rf"{_OP}\.context_module\.main\.qkv\.conv\.weight", r"stages.\1.blocks.\2.attn.qkv.weight"),
    (rf"{_OP}\.context_module\.main\.proj\.conv\.weight", r"stages.\1.blocks.\2.attn.proj.weight"),
    (rf"{_OP}\.context_module\.main\.proj\.norm\.{_B}", r"stages.\1.blocks.\2.attn.norm.\3"),
    (rf"{_OP}\.local_module\.main\.inverted_conv\.conv\.{_B}", r"stages.\1.blocks.\2.mlp.inverted.\3"),
    (rf"{_OP}\.local_module\.main\.depth_conv\.conv\.{_B}", r"stages.\1.blocks.\2.mlp.depthwise.\3"),
    (rf"{_OP}\.local_module\.main\.point_conv\.conv\.{_B}", r"stages.\1.blocks.\2.mlp.point.\3"),
    (rf"{_OP}\.local_module\.main\.point_conv\.norm\.{_B}", r"stages.\1.blocks.\2.mlp.norm.\3"),
    (rf"{_OP}\.(?:main\.)?conv\.conv\.{_B}", r"stages.\1.down.conv.\3"),  # ConvPixelUnshuffle (+ shortcut)
    (rf"project_out\.(?:main\.)?op_list\.0\.conv\.{_B}", r"project_out.\1"),
]

_RES = r"(norm1|conv1|norm2|conv2)"
_ATTN = r"mid_block\.attentions\.0"
KL_DIFFUSERS = [
    (rf"conv_in\.{_B}", r"conv_in.\1"),
    (rf"down_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}\.{_B}", r"levels.\1.blocks.\2.\3.\4"),
    (rf"down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.{_B}", r"levels.\1.blocks.\2.skip.\3"),
    (rf"down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_B}", r"levels.\1.down.conv.\2"),
    (rf"mid_block\.resnets\.0\.{_RES}\.{_B}", r"mid.block1.\1.\2"),
    (rf"mid_block\.resnets\.1\.{_RES}\.{_B}", r"mid.block2.\1.\2"),
    (rf"{_ATTN}\.group_norm\.{_B}", r"mid.attn.norm.\1"),
    (rf"{_ATTN}\.(?:to_q|query)\.{_B}", r"mid.attn.qkv.\1#0"),  # query/key/value/proj_attn: pre-0.14 diffusers
    (rf"{_ATTN}\.(?:to_k|key)\.{_B}", r"mid.attn.qkv.\1#1"),
    (rf"{_ATTN}\.(?:to_v|value)\.{_B}", r"mid.attn.qkv.\1#2"),
    (rf"{_ATTN}\.(?:to_out\.0|proj_attn)\.{_B}", r"mid.attn.proj.\1"),
    (rf"conv_norm_out\.{_B}", r"norm_out.\1"),
    (rf"conv_out\.{_B}", r"conv_out.\1"),
    (rf"quant_conv\.{_B}", r"quant_conv.\1"),
]

KL_LDM = [
    (rf"conv_in\.{_B}", r"conv_in.\1"),
    (rf"down\.(\d+)\.block\.(\d+)\.{_RES}\.{_B}", r"levels.\1.blocks.\2.\3.\4"),
    (rf"down\.(\d+)\.block\.(\d+)\.nin_shortcut\.{_B}", r"levels.\1.blocks.\2.skip.\3"),
    (rf"down\.(\d+)\.downsample\.conv\.{_B}", r"levels.\1.down.conv.\2"),
    (rf"mid\.block_1\.{_RES}\.{_B}", r"mid.block1.\1.\2"),
    (rf"mid\.block_2\.{_RES}\.{_B}", r"mid.block2.\1.\2"),
    (rf"mid\.attn_1\.norm\.{_B}", r"mid.attn.norm.\1"),
    (rf"mid\.attn_1\.q\.{_B}", r"mid.attn.qkv.\1#0"),
    (rf"mid\.attn_1\.k\.{_B}", r"mid.attn.qkv.\1#1"),
    (rf"mid\.attn_1\.v\.{_B}", r"mid.attn.qkv.\1#2"),
    (rf"mid\.attn_1\.proj_out\.{_B}", r"mid.attn.proj.\1"),
    (rf"norm_out\.{_B}", r"norm_out.\1"),
    (rf"conv_out\.{_B}", r"conv_out.\1"),
    (rf"quant_conv\.{_B}", r"quant_conv.\1"),
]


def _apply_rules(state: dict[str, torch.Tensor], rules) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key by the first matching rule and merge "#i" parts; also return the keys no rule matched."""
    out, parts, unmatched = {}, {}, []
    for key, value in state.items():
        for pattern, replacement in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = m.expand(replacement)
                if "#" in new:
                    name, i = new.split("#")
                    parts.setdefault(name, {})[int(i)] = value
                else:
                    out[new] = value
                break
        else:
            unmatched.append(key)
    for name, pieces in parts.items():
        if sorted(pieces) != list(range(3)):
            unmatched.append(f"{name} (only parts {sorted(pieces)} of q, k, v found)")
            continue
        out[name] = torch.cat([pieces[i].flatten(1) if pieces[i].ndim > 1 else pieces[i] for i in range(3)], dim=0)
    return out, unmatched


def _strip(state: dict[str, torch.Tensor], keep_top: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The encoder's own keys: unwrap `first_stage_model.` / `vae.` / `module.`, keep `encoder.*` without the prefix
    (plus top-level keys starting with `keep_top`, e.g. `quant_conv.`); a bare encoder file is kept as is."""
    for wrapper in ("first_stage_model.", "vae.", "module."):
        inner = {k[len(wrapper):]: v for k, v in state.items() if k.startswith(wrapper)}
        if inner and (len(inner) == len(state) or any(k.startswith("encoder.") for k in inner)):
            state = inner
    if not any(k.startswith("encoder.") for k in state):
        return dict(state)
    sub = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if keep_top:
        sub.update({k: v for k, v in state.items() if k.startswith(keep_top)})
    return sub


def convert_state_dict(encoder: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, list[str], str]:
    """Map a checkpoint onto `encoder`'s key names: (tensors, checkpoint keys no rule matched, detected format)."""
    from dcssdae.encoder import DCEncoder
    from dcssdae.encoder_kl import KLEncoder

    if isinstance(encoder, DCEncoder):
        sub = _strip(state)
        if "project_out.weight" in sub:  # our names (the others call it conv_out / project_out.*.op_list)
            return sub, [], "dcssdae"
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in sub):
            return (*_apply_rules(sub, DC_DIFFUSERS), "diffusers")
        if any(".op_list." in k or k.startswith("project_in.") for k in sub):
            return (*_apply_rules(sub, DC_MIT), "mit-dc-ae")
        return sub, [], "unknown"
    if isinstance(encoder, KLEncoder):
        sub = _strip(state, keep_top=("quant_conv.",))
        if any(k.startswith("levels.") for k in sub):
            return sub, [], "dcssdae"
        if any(k.startswith("down_blocks.") for k in sub):
            return (*_apply_rules(sub, KL_DIFFUSERS), "diffusers")
        if any(k.startswith("down.") for k in sub):
            return (*_apply_rules(sub, KL_LDM), "ldm")
        return sub, [], "unknown"
    raise TypeError(f"no weight mapping for {type(encoder).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Checking and loading.


def _fit_shapes(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Reshape tensors that differ from ours only by trailing singleton dims (Linear <-> 1x1 conv)."""
    def core(shape):
        return tuple(shape[:2]) + tuple(d for d in shape[2:] if d != 1)

    for key, value in converted.items():
        if key in expected and value.shape != expected[key].shape and core(value.shape) == core(expected[key].shape):
            converted[key] = value.reshape(expected[key].shape)


def _latent_heads(encoder: nn.Module, converted: dict[str, torch.Tensor], logvar_fill: float) -> tuple[list, list]:
    """Reconcile deterministic / Gaussian heads of a DCEncoder and the checkpoint; return (filled, ignored) keys."""
    filled, ignored = [], []
    if "project_out.weight" not in converted:
        return filled, ignored
    c = encoder.latent_channels
    w = converted["project_out.weight"]
    if w.shape[0] == 2 * c and "project_logvar.weight" not in converted:  # one conv for (mean, logvar): split
        if encoder.out_shortcut:
            raise ValueError("checkpoint has a 2c-channel (mean, logvar) output conv with an averaging out-shortcut: "
                             "its shortcut semantics differ from ours; build the encoder with out_shortcut=False")
        b = converted["project_out.bias"]
        converted["project_out.weight"], converted["project_logvar.weight"] = w[:c], w[c:]
        converted["project_out.bias"], converted["project_logvar.bias"] = b[:c], b[c:]
    if encoder.project_logvar is not None and "project_logvar.weight" not in converted:
        weight = encoder.project_logvar.weight
        converted["project_logvar.weight"] = torch.zeros(weight.shape, dtype=weight.dtype)
        converted["project_logvar.bias"] = torch.full((c,), logvar_fill, dtype=weight.dtype)
        filled += ["project_logvar.weight", "project_logvar.bias"]
    if encoder.project_logvar is None:
        ignored = [k for k in ("project_logvar.weight", "project_logvar.bias") if converted.pop(k, None) is not None]
    return filled, ignored


def _problems(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], unmatched: list[str]) -> str:
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected)) + [f"{k} (no mapping)" for k in unmatched]
    mismatched = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(converted) & set(expected)) if converted[k].shape != expected[k].shape]
    lines = []
    for title, items in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            shown = items[:25] + ([f"... and {len(items) - 25} more"] if len(items) > 25 else [])
            lines.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    return "\n".join(lines)


def load_encoder_weights(encoder: nn.Module, path: str | Path, logvar_fill: float = LOGVAR_FILL) -> dict:
    """Load pretrained weights into `encoder` (in place). Raises ValueError naming every mismatched, missing or
    unexpected tensor. Returns a report: {"file", "format", "filled", "ignored"}."""
    from dcssdae.encoder import DCEncoder

    state, config, file = read_state_dict(path)
    expected_class = "AutoencoderDC" if isinstance(encoder, DCEncoder) else "AutoencoderKL"
    if config is not None and config.get("_class_name", expected_class) != expected_class:
        raise ValueError(f"{file.parent}/config.json is a {config['_class_name']}, but "
                         f"{type(encoder).__name__} loads {expected_class} weights")
    converted, unmatched, fmt = convert_state_dict(encoder, state)
    if fmt == "unknown":
        raise ValueError(f"{file}: unrecognised key names for {type(encoder).__name__} "
                         f"(first keys: {sorted(state)[:5]})")
    expected = encoder.state_dict()
    _fit_shapes(converted, expected)
    filled, ignored = _latent_heads(encoder, converted, logvar_fill) if isinstance(encoder, DCEncoder) else ([], [])
    problems = _problems(converted, expected, unmatched)
    if problems:
        raise ValueError(f"{file} ({fmt} format) does not fit {getattr(encoder, 'name', type(encoder).__name__)}:\n"
                         f"{problems}")
    encoder.load_state_dict(converted, strict=True)
    log.info("loaded %s weights from %s%s%s", fmt, file, f"; set to a constant: {filled}" if filled else "",
             f"; ignored: {ignored}" if ignored else "")
    return {"file": str(file), "format": fmt, "filled": filled, "ignored": ignored}
