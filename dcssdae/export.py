"""`dcssdae export`: a training checkpoint -> a folder a user loads (`DCSSDAE.from_pretrained`, diffusers), and
`load_model`, which loads any of them.

Export directory (what `DCSSDAE.from_pretrained(OUT_DIR)` reads):

    OUT_DIR/model.safetensors   state_dict of the DCSSDAE autoencoder (encoder.*, decoder.*): the EMA weights of
                                the checkpoint by default, the live training weights with --no-ema.
    OUT_DIR/config.json         DCSSDAE.config() (encoder, decoder, overrides, corruption, sampler, latent_scale,
                                latent_shift), enough to rebuild the network, plus one key "export" with metadata:
                                format, source checkpoint, global step, epoch, which weights, EMA settings, date,
                                dcssdae version, and "latent_stats" once `dcssdae latent-stats` has measured them.

Every file is written atomically (a temporary file or directory, then a rename), and weights are read only with
safetensors or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from dcssdae.atomic_files import atomic_folder, write_json

EXPORT_FORMAT = "dcssdae-export-1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ToolError(Exception):
    """A problem with the command's input (bad path, wrong kind of file): printed without a traceback."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _first_lines(error: Exception, n: int = 6) -> str:
    """The start of a long message (torch lists every mismatched tensor)."""
    lines = str(error).strip().splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Export: checkpoint -> OUT_DIR/{model.safetensors, config.json}


def write_export(model, out_dir: str | Path, metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `model` (a DCSSDAE) as an export directory: its state_dict as safetensors + config.json.

    The directory is assembled next to `out_dir` and renamed into place; an existing `out_dir` is replaced only
    with `overwrite=True`.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise ToolError(f"{out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ToolError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = {**model.config(), "export": {"format": EXPORT_FORMAT, **(metadata or {})}}
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_folder(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "dcssdae_export": EXPORT_FORMAT})
        write_json(config, tmp / CONFIG_FILE)
    return out_dir


def read_checkpoint(ckpt: str | Path, ema: bool = True) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(DCSSDAE config, autoencoder state_dict, metadata) of a Lightning checkpoint written by `dcssdae fit`.

    Where the weights are (see dcssdae.callbacks): `state_dict["ae.*"]` holds the EMA weights when the run had
    an EMA (then `current_model_state["ae.*"]` holds the live ones), the live weights otherwise.
    """
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        raise ToolError(f"{ckpt} is a directory; `dcssdae export` reads a Lightning .ckpt file (from `dcssdae fit`)")
    if not ckpt.is_file():
        raise ToolError(f"checkpoint not found: {ckpt}")
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one that needs unpickling arbitrary objects
        raise ToolError(f"cannot read {ckpt} as a checkpoint (torch.load, weights_only=True): {error}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "dcssdae_config" not in checkpoint:
        raise ToolError(f"{ckpt} is not a checkpoint written by `dcssdae fit` (no 'state_dict'/'dcssdae_config')")
    has_ema = "current_model_state" in checkpoint
    if ema and not has_ema:
        warnings.warn(f"{ckpt} has no EMA weights (trained without EMA): exporting the training weights")
    source = checkpoint["current_model_state"] if (has_ema and not ema) else checkpoint["state_dict"]
    state = {k[len("ae."):]: v for k, v in source.items() if k.startswith("ae.")}
    if not state:
        raise ToolError(f"{ckpt}: no autoencoder weights (no 'ae.*' entries in the state_dict)")
    metadata = {
        "source_checkpoint": str(ckpt.resolve()),
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "weights": "ema" if (ema and has_ema) else "training (no EMA in checkpoint)" if ema else "training",
        "ema": checkpoint.get("callbacks", {}).get("EMA") if has_ema else None,
    }
    return checkpoint["dcssdae_config"], state, metadata


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, ema: bool = True, overwrite: bool = False) -> Path:
    """`dcssdae export`: rebuild the network from the checkpoint's config, load its weights strictly, write."""
    from dcssdae import __version__
    from dcssdae.autoencoder import DCSSDAE

    config, state, metadata = read_checkpoint(ckpt, ema)
    try:
        model = DCSSDAE.from_config(config)
        result = model.load_state_dict(state, strict=False)
    except (ValueError, RuntimeError) as error:  # unknown config key; tensor shapes that differ from the config's
        raise ToolError(f"{ckpt}: weights do not match the network of its config: {_first_lines(error)}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ToolError(f"{ckpt}: weights do not match the network of its config: missing "
                        f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    metadata.update(date=_now(), dcssdae_version=__version__)
    return write_export(model, out_dir, metadata, overwrite)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A DCSSDAE in eval mode from an export directory or a `dcssdae fit` checkpoint."""
    from dcssdae.autoencoder import DCSSDAE

    path = Path(path)
    if not path.exists():
        raise ToolError(f"no model at {path} (an export directory from `dcssdae export`, or a .ckpt)")
    try:
        return DCSSDAE.from_pretrained(path, map_location="cpu").to(device).eval()
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:  # RuntimeError: shape mismatch
        raise ToolError(f"cannot load a model from {path}: {_first_lines(error)}") from error


def main_export(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae export",
        description="Export the EMA weights of a `dcssdae fit` checkpoint to OUT_DIR/model.safetensors + "
        "OUT_DIR/config.json (loadable with DCSSDAE.from_pretrained(OUT_DIR)).",
    )
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt) written by `dcssdae fit`")
    parser.add_argument("out_dir", help="export directory to create")
    parser.add_argument("--no-ema", action="store_true", help="export the live training weights instead of the EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out_dir, ema=not args.no_ema, overwrite=args.overwrite)
    except ToolError as error:
        print(f"dcssdae export: error: {error}", file=sys.stderr)
        return 2
    info = json.loads((out / CONFIG_FILE).read_text())["export"]
    print(f"exported {info['weights']} weights of {args.ckpt} (step {info['global_step']}) to {out}")
    return 0
