"""Using a trained model: `dcssdae export`, `dcssdae reconstruct`, `dcssdae latent-stats`.

Export directory (what `DCSSDAE.from_pretrained(OUT_DIR)` reads):

    OUT_DIR/model.safetensors   state_dict of the DCSSDAE autoencoder (encoder.*, decoder.*): the EMA weights of
                                the checkpoint by default, the live training weights with --no-ema.
    OUT_DIR/config.json         DCSSDAE.config() (encoder, decoder, overrides, corruption, sampler, latent_scale,
                                latent_shift), enough to rebuild the network, plus one key "export" with metadata:
                                format, source checkpoint, global step, epoch, which weights, EMA settings, date,
                                dcssdae version, and "latent_stats" once `dcssdae latent-stats` has measured them.

Every file is written atomically (a temporary file or directory, then a rename), and weights are read only with
safetensors or `torch.load(weights_only=True)`.

Latent scaling (the DC-AE / Stable Diffusion convention, Rombach et al. 2022, Sec. 4.3.2): `encode` multiplies by
the scaling factor, `decode` divides by it:

    z_scaled = (z - latent_shift) * latent_scale      # DCSSDAE.encode, z = posterior mean
    z        = z_scaled / latent_scale + latent_shift # DCSSDAE.decode

`dcssdae latent-stats` measures the mean and standard deviation of z (all channels and positions pooled, float64)
over images and sets latent_scale = 1 / std, leaving latent_shift = 0 as DC-AE and SD do (their scaled latents
then have unit standard deviation about their mean). With --shift it also sets latent_shift = mean (the SD3 / FLUX
convention: zero-mean, unit-variance latents). These are diffusers' `scaling_factor` and `shift_factor` (a pipeline
computes (z - shift_factor) * scaling_factor after encoding and undoes it before decoding): `AutoencoderDCSSD`
(`dcssdae.pipeline`) loaded from the export has config.scaling_factor = latent_scale, config.shift_factor =
latent_shift, and returns raw latents.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from dcssdae.files import atomic_folder, write_json

EXPORT_FORMAT = "dcssdae-export-1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


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


# ----------------------------------------------------------------------------------------------------------------
# Reconstruct image files: OUT/<name>.png = input | reconstruction, and a PSNR line per image.


def _read_image(path: Path, size: int | None = None):
    """RGB uint8 tensor (3, H, W): the whole image at its own size, or with `size` the short side resized to it and
    a centre crop size x size (the validation transform)."""
    import numpy as np

    from dcssdae.images import decode_image, val_transform

    img = decode_image(path.read_bytes())
    if size is not None:
        img = val_transform(img, size)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def save_pair_png(x_u8: torch.Tensor, x_hat_u8: torch.Tensor, path: Path) -> None:
    """Writes one image and its reconstruction, (3, H, W) uint8 each, side by side as `path` (PNG, atomically).
    The layout of `dcssdae reconstruct` and `dcssdae predict`."""
    from PIL import Image

    side_by_side = torch.cat([x_u8, x_hat_u8], dim=2).permute(1, 2, 0).cpu().numpy()  # (H, 2W, 3)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(side_by_side).save(tmp, format="PNG")
    os.replace(tmp, path)


def _unique_name(stem: str, taken: set[str]) -> str:
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}"
    taken.add(name)
    return name


def reconstruct_files(
    model,
    images: list[str | Path],
    out_dir: str | Path,
    size: int | None = None,
    steps: int | None = None,
    method: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    log=print,
    pad: bool = True,
) -> tuple[list[tuple[Path, float, Path]], list[tuple[Path, str]]]:
    """Reconstruct image files with `model`; returns ([(input, PSNR dB, output PNG)], [(input, error)]).

    Each image is used whole at its own size (or resized and centre-cropped to `size` x `size`); with `pad`, sides
    that are not multiples of the compression factor are reflect-padded and the reconstruction is cropped back
    (`DCSSDAE.reconstruct(pad=True)`), otherwise such an image is an error. Consecutive images of one size are
    batched. Unreadable files are reported through `log` and skipped. PSNR is on the 8-bit images, as in
    `dcssdae.metrics`. The noise comes from a CPU generator seeded with `seed` (same result on any device).
    """
    from dcssdae.metrics import psnr_uint8, quantize_uint8
    from dcssdae.tiling import pad_to_multiple

    f = model.downsample_factor
    if size is not None and size % f and not pad:
        raise ToolError(f"--size {size} is not a multiple of the encoder's downsampling factor {f} (drop --no-pad "
                        "to pad and crop back)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded, failed, taken = [], [], set()
    for path in map(Path, images):
        try:
            image = _read_image(path, size)
        except (OSError, ValueError) as error:  # missing file, directory, ImageDecodeError
            failed.append((path, str(error)))
            log(f"{path}: cannot read: {error}")
            continue
        if not pad and (image.shape[1] % f or image.shape[2] % f):
            failed.append((path, f"size {image.shape[2]}x{image.shape[1]} is not a multiple of {f}"))
            log(f"{path}: size {image.shape[2]}x{image.shape[1]} is not a multiple of the encoder's downsampling "
                f"factor {f} (drop --no-pad to pad and crop back)")
            continue
        loaded.append((path, image))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    done = []
    batches = []  # consecutive images of one size, at most batch_size each
    for item in loaded:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1].shape == item[1].shape:
            batches[-1].append(item)
        else:
            batches.append([item])
    for batch in batches:
        x_u8 = torch.stack([image for _, image in batch])  # (B, 3, H, W)
        x = x_u8.float().div(127.5).sub(1).to(device)
        noise = torch.randn(pad_to_multiple(x, f)[0].shape, generator=generator).to(device)
        with torch.no_grad():
            x_hat = model.reconstruct(x, pad=True, noise=noise, steps=steps, method=method).float().clamp(-1, 1)
        x_hat_u8 = quantize_uint8(x_hat).cpu()
        psnr, _ = psnr_uint8(x_hat_u8, x_u8)
        for (path, _), a, b, p in zip(batch, x_u8, x_hat_u8, psnr.tolist()):
            out = out_dir / (_unique_name(path.stem, taken) + ".png")
            save_pair_png(a, b, out)
            done.append((path, p, out))
            log(f"{path}: PSNR {p:.2f} dB -> {out}")
    return done, failed


def main_reconstruct(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae reconstruct",
        description="Encode and decode image files, each whole at its own size (sides padded to a multiple of the "
        "compression factor and cropped back); write OUT/<name>.png (input | reconstruction) and print the "
        "PSNR of each (8-bit). Exit status 1 if any file could not be read.",
    )
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", required=True, help="export directory (`dcssdae export`) or .ckpt")
    parser.add_argument("--size", type=int, default=None,
                        help="short side resize + centre crop to SIZE x SIZE (default: the whole image at its size)")
    parser.add_argument("--no-pad", action="store_true",
                        help="refuse sides that are not multiples of the compression factor (default: reflect-pad "
                        "them and crop the reconstruction back)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tiled encoding/decoding with TILE px tiles (a multiple of the compression factor), for "
                        "large images in bounded memory")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap in px (with --tile)")
    parser.add_argument("--steps", type=int, default=1,
                        help="sampler steps (default 1: the one-step decoder); 0 = the model's configured sampler")
    parser.add_argument("--sampler", default=None,
                        help="sampling method (gd, nesterov, adaptive, one_step for EqM; euler for FM); default: the "
                        "model's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoding noise")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, _device(args.device))
        if args.tile is not None:
            model.enable_tiling(args.tile, min(args.overlap, args.tile - model.downsample_factor))
        done, failed = reconstruct_files(model, args.images, args.out, args.size, args.steps or None, args.sampler,
                                         args.seed, args.batch_size, pad=not args.no_pad)
    except (ToolError, ValueError) as error:  # ValueError: a sampler setting the model rejects
        print(f"dcssdae reconstruct: error: {error}", file=sys.stderr)
        return 2
    if done:
        mean = sum(p for _, p, _ in done) / len(done)
        lines = [f"{path}\t{p:.4f}\t{out}" for path, p, out in done]
        (Path(args.out) / "psnr.tsv").write_text("image\tpsnr_db\toutput\n" + "\n".join(lines) + "\n")
        print(f"{len(done)} image(s), mean PSNR {mean:.2f} dB; table: {Path(args.out) / 'psnr.tsv'}")
    if failed:
        print(f"{len(failed)} file(s) could not be read: {', '.join(str(p) for p, _ in failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Latent statistics -> latent_scale (and optionally latent_shift) in an export's config.json


def _image_batches(data: str, size: int, batch_size: int):
    """Batches {"image": (B, 3, S, S) in [-1, 1]} from WebDataset shards (a .tar, a brace pattern, a directory of
    .tar files) or from a directory of image files (recursive); unreadable images are skipped with a warning."""
    from dcssdae.data import ValShards, collate, decode_image, expand_urls, val_transform

    path = Path(data)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if shards:
            yield from ValShards(shards, size, batch_size, rank=0, world_size=1)
            return
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ToolError(f"{data}: no .tar shards and no image files in this directory")
        images = []
        for file in files:
            try:
                images.append(val_transform(decode_image(file.read_bytes()), size))
            except (OSError, ValueError) as error:
                warnings.warn(f"skipped {file}: {error}")
                continue
            if len(images) == batch_size:
                yield collate(images, [-1] * len(images), [""] * len(images))
                images = []
        if images:
            yield collate(images, [-1] * len(images), [""] * len(images))
        return
    urls = expand_urls(data)
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise ToolError(f"--data {data}: not a directory, and shard file(s) not found: {missing[:3]}")
    yield from ValShards(urls, size, batch_size, rank=0, world_size=1)


@torch.no_grad()
def measure_latent_stats(model, batches, num_images: int | None = None) -> dict[str, float | int]:
    """Mean and standard deviation of the raw posterior mean z over all values, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and sum of squared deviations), which stays exact
    where "E[z^2] - E[z]^2" would cancel.
    """
    device = next(model.parameters()).device
    count, mean, m2, seen = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        x = batch["image"]
        if num_images is not None:
            x = x[: num_images - seen]
        if x.shape[0] == 0:
            break
        z = model.encoder(x.to(device)).mode().double().flatten().cpu()  # raw latent: no scale/shift
        n_b, mean_b = z.numel(), z.mean()
        m2_b = (z - mean_b).square().sum()
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta.square() * count * n_b / total
        count, seen = total, seen + x.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if seen == 0:
        raise ToolError("no images were read from --data")
    std = (m2 / count).sqrt().item()
    if not std > 0:
        raise ToolError(f"the latents have standard deviation {std}: cannot scale them")
    return {"mean": mean.item(), "std": std, "num_images": seen, "num_values": count}


def write_latent_stats(export_dir: str | Path, stats: dict, shift: bool = False, data: str | None = None) -> dict:
    """Set latent_scale = 1 / std (and latent_shift = mean with `shift`) in the export's config.json."""
    config_path = Path(export_dir) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["latent_scale"] = 1.0 / stats["std"]
    config["latent_shift"] = stats["mean"] if shift else 0.0
    config.setdefault("export", {})["latent_stats"] = {
        **stats, "data": data, "shift": shift, "date": _now(),
        "convention": "encode: (z - latent_shift) * latent_scale; decode: z_scaled / latent_scale + latent_shift",
        "diffusers": {"scaling_factor": config["latent_scale"], "shift_factor": config["latent_shift"]},
    }
    write_json(config, config_path)
    return config


def main_latent_stats(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae latent-stats",
        description="Measure mean/std of the encoder's latents (posterior mean) over images and store "
        "latent_scale = 1/std (DC-AE convention: encode multiplies, decode divides) in MODEL/config.json.",
    )
    parser.add_argument("model", help="export directory (from `dcssdae export`); its config.json is updated")
    parser.add_argument("--data", required=True,
                        help="WebDataset shards (.tar, brace pattern or a directory of .tar) or a folder of images")
    parser.add_argument("--num-images", type=int, default=None, help="use at most N images (default: all)")
    parser.add_argument("--size", type=int, default=256, help="short side resize + centre crop to SIZE x SIZE")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shift", action="store_true",
                        help="also set latent_shift = mean (zero-mean latents; SD3/FLUX convention)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    try:
        if not (Path(args.model) / CONFIG_FILE).is_file():
            raise ToolError(f"{args.model} is not an export directory (no {CONFIG_FILE}); latent-stats writes "
                            "into an export: run `dcssdae export CKPT OUT_DIR` first")
        model = load_model(args.model, _device(args.device))
        stats = measure_latent_stats(model, _image_batches(args.data, args.size, args.batch_size), args.num_images)
        config = write_latent_stats(args.model, stats, args.shift, args.data)
    except ToolError as error:
        print(f"dcssdae latent-stats: error: {error}", file=sys.stderr)
        return 2
    print(f"{stats['num_images']} images, {stats['num_values']} latent values: mean {stats['mean']:.6g}, "
          f"std {stats['std']:.6g} -> latent_scale {config['latent_scale']:.6g}, latent_shift "
          f"{config['latent_shift']:.6g} written to {Path(args.model) / CONFIG_FILE} (diffusers: scaling_factor, "
          "shift_factor of AutoencoderDCSSD.from_pretrained(MODEL))")
    return 0
