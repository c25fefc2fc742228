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

from dcssdae.encoders.dc_ae import DCEncoder
from dcssdae.encoders.kl_f8 import KLEncoder

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
# Key mappings, as data: one table per encoder, a row per tensor: our name, then that tensor's name in each
# checkpoint format (None: the format has no such tensor; a tuple: any of these names). Names are templates whose
# fields `{s}` (stage), `{i}` (block), `{r}` (ResNet layer), `{p}` (weight|bias) stand for the parts that vary. Our
# name ending in "#i" is part i of a tensor concatenated along dim 0 (q, k, v -> qkv).

_FIELDS = {"s": r"\d+", "i": r"\d+", "r": "norm1|conv1|norm2|conv2", "p": "weight|bias"}

# DC-AE: our names | diffusers AutoencoderDC | MIT efficientvit DCAE (`main.` only where a shortcut wraps the op).
_B, _D, _M = "stages.{s}.blocks.{i}.", "down_blocks.{s}.{i}.", "stages.{s}.op_list.{i}."
DC_KEYS = [
    ("project_in.conv.{p}",      "conv_in.conv.{p}",                "project_in.conv.conv.{p}"),
    ("project_in.{p}",           "conv_in.{p}",                     "project_in.conv.{p}"),
    (_B + "conv1.{p}",           _D + "conv1.{p}",                  _M + "main.conv1.conv.{p}"),
    (_B + "conv2.{p}",           _D + "conv2.{p}",                  _M + "main.conv2.conv.{p}"),
    (_B + "norm.{p}",            _D + "norm.{p}",                   _M + "main.conv2.norm.{p}"),
    (_B + "attn.qkv.weight#0",   _D + "attn.to_q.weight",           None),
    (_B + "attn.qkv.weight#1",   _D + "attn.to_k.weight",           None),
    (_B + "attn.qkv.weight#2",   _D + "attn.to_v.weight",           None),
    (_B + "attn.qkv.weight",     None,                              _M + "context_module.main.qkv.conv.weight"),
    (_B + "attn.proj.weight",    _D + "attn.to_out.weight",         _M + "context_module.main.proj.conv.weight"),
    (_B + "attn.norm.{p}",       _D + "attn.norm_out.{p}",          _M + "context_module.main.proj.norm.{p}"),
    (_B + "mlp.inverted.{p}",    _D + "conv_out.conv_inverted.{p}", _M + "local_module.main.inverted_conv.conv.{p}"),
    (_B + "mlp.depthwise.{p}",   _D + "conv_out.conv_depth.{p}",    _M + "local_module.main.depth_conv.conv.{p}"),
    (_B + "mlp.point.{p}",       _D + "conv_out.conv_point.{p}",    _M + "local_module.main.point_conv.conv.{p}"),
    (_B + "mlp.norm.{p}",        _D + "conv_out.norm.{p}",          _M + "local_module.main.point_conv.norm.{p}"),
    ("stages.{s}.down.conv.{p}", _D + "conv.{p}",                   (_M + "main.conv.conv.{p}", _M + "conv.conv.{p}")),
    ("project_out.{p}",          "conv_out.{p}",                    ("project_out.main.op_list.0.conv.{p}",
                                                                     "project_out.op_list.0.conv.{p}")),
]

# KL-f8: our names | diffusers AutoencoderKL (`to_q`... since diffusers 0.14, `query`... before) | LDM / SD.
_DR, _LR, _A = "down_blocks.{s}.resnets.{i}.", "down.{s}.block.{i}.", "mid_block.attentions.0."
KL_KEYS = [
    ("conv_in.{p}",              "conv_in.{p}",                             "conv_in.{p}"),
    (_B + "{r}.{p}",             _DR + "{r}.{p}",                           _LR + "{r}.{p}"),
    (_B + "skip.{p}",            _DR + "conv_shortcut.{p}",                 _LR + "nin_shortcut.{p}"),
    ("stages.{s}.down.conv.{p}", "down_blocks.{s}.downsamplers.0.conv.{p}", "down.{s}.downsample.conv.{p}"),
    ("mid.block1.{r}.{p}",       "mid_block.resnets.0.{r}.{p}",             "mid.block_1.{r}.{p}"),
    ("mid.block2.{r}.{p}",       "mid_block.resnets.1.{r}.{p}",             "mid.block_2.{r}.{p}"),
    ("mid.attn.norm.{p}",        _A + "group_norm.{p}",                     "mid.attn_1.norm.{p}"),
    ("mid.attn.qkv.{p}#0",       (_A + "to_q.{p}", _A + "query.{p}"),       "mid.attn_1.q.{p}"),
    ("mid.attn.qkv.{p}#1",       (_A + "to_k.{p}", _A + "key.{p}"),         "mid.attn_1.k.{p}"),
    ("mid.attn.qkv.{p}#2",       (_A + "to_v.{p}", _A + "value.{p}"),       "mid.attn_1.v.{p}"),
    ("mid.attn.proj.{p}",        (_A + "to_out.0.{p}", _A + "proj_attn.{p}"), "mid.attn_1.proj_out.{p}"),
    ("norm_out.{p}",             "conv_norm_out.{p}",                       "norm_out.{p}"),
    ("conv_out.{p}",             "conv_out.{p}",                            "conv_out.{p}"),
    ("quant_conv.{p}",           "quant_conv.{p}",                          "quant_conv.{p}"),
]


def _pattern(name: str) -> re.Pattern:
    """A key-name template as a regex: each `{x}` becomes the named group x matching `_FIELDS[x]`, the rest literal."""
    return re.compile(re.sub(r"\\\{(\w)\\\}", lambda m: f"(?P<{m[1]}>{_FIELDS[m[1]]})", re.escape(name)))


def _rules(table: list[tuple], column: int) -> list[tuple[re.Pattern, str]]:
    """The (regex, replacement) rules of one checkpoint format: its names in `column` of `table`, ours in column 0."""
    rules = []
    for ours, *theirs in table:
        names = theirs[column - 1]
        if isinstance(names, str):
            names = (names,)
        for name in names or ():
            rules.append((_pattern(name), re.sub(r"\{(\w)\}", r"\\g<\1>", ours)))
    return rules


DC_DIFFUSERS, DC_MIT = _rules(DC_KEYS, 1), _rules(DC_KEYS, 2)
KL_DIFFUSERS, KL_LDM = _rules(KL_KEYS, 1), _rules(KL_KEYS, 2)


def _apply_rules(state: dict[str, torch.Tensor], rules) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key by the first matching rule and merge "#i" parts; also return the keys no rule matched."""
    out, parts, unmatched = {}, {}, []
    for key, value in state.items():
        for pattern, replacement in rules:
            m = pattern.fullmatch(key)
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
        if any(k.startswith("stages.") for k in sub):
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
