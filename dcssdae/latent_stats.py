"""`dcssdae latent-stats`: measure the latent statistics of a trained model and write them into an export.

Latent scaling (the DC-AE / Stable Diffusion convention, Rombach et al. 2022, Sec. 4.3.2): `encode` multiplies by
the scaling factor, `decode` divides by it:

    z_scaled = (z - latent_shift) * latent_scale      # DCSSDAE.encode, z = posterior mean
    z        = z_scaled / latent_scale + latent_shift # DCSSDAE.decode

`dcssdae latent-stats` measures the mean and standard deviation of z (all channels and positions pooled, float64)
over images and sets latent_scale = 1 / std, leaving latent_shift = 0 as DC-AE and SD do (their scaled latents
then have unit standard deviation about their mean). With --shift it also sets latent_shift = mean (the SD3 / FLUX
convention: zero-mean, unit-variance latents). These are diffusers' `scaling_factor` and `shift_factor` (a pipeline
computes (z - shift_factor) * scaling_factor after encoding and undoes it before decoding): `AutoencoderDCSSD`
(`dcssdae.diffusers_model`) loaded from the export has config.scaling_factor = latent_scale, config.shift_factor =
latent_shift, and returns raw latents.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from dcssdae.atomic_files import write_json
from dcssdae.export import CONFIG_FILE, ToolError, _device, _now, load_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


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
