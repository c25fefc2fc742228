"""Encode throughput: the `dcssdae latents` loop against diffusers' `AutoencoderDC`, same images, same weights.

One process. A DC-AE encoder with random weights is made as a diffusers `AutoencoderDC` (the dc-ae-f32c32-in-1.0
layout by default) and loaded into dcssdae's encoder through its diffusers converter (`encoder_pretrained`), so both
hold the same weights (the latents are compared: `max_abs_diff`). N JPEGs (500 x 375, cut from the default photos)
are written as image shards, then, in interleaved rounds, images/s of:
  * `dcssdae latents`: its encode loop (`dcssdae.latents.encode_shards`) end to end: read the shards, decode and
    preprocess (validation transform) in --workers processes, encode, write the latent shards (float16);
  * diffusers: `AutoencoderDC.encode(x).latent` on the same preprocessed images, held in memory (the network alone);
  * dcssdae's encoder network alone on the same tensors.
`ratio` = `dcssdae latents` / diffusers (>= 1: the whole loop is as fast as diffusers' network alone);
`network_ratio` = dcssdae network / diffusers network.

    python benchmarks/bench_encode.py --images 8 --batch-size 8 --threads 1 --json docs/bench/encode_cpu_256.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_loader: the shared image writer
from bench_loader import write_images

from dcssdae.atomic_files import write_json
from dcssdae.autoencoder import DCSSDAE
from dcssdae.data import ValShards
from dcssdae.latents import encode_shards
from dcssdae.shards import list_folder, write_shards


def dc_config(latent_channels: int, head_dim: int, widths: tuple[int, ...], depths: tuple[int, ...]) -> dict:
    """A DC-AE 1.0 encoder (ResBlock stages, then EfficientViT stages) in AutoencoderDC's arguments."""
    return {"latent_channels": latent_channels, "attention_head_dim": head_dim, "encoder_block_out_channels": widths,
            "encoder_layers_per_block": depths, "encoder_qkv_multiscales": ((),) * 6,
            "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3}


# diffusers AutoencoderDC configurations of dcssdae's encoder presets (the full-size one is DC-AE f32c32-in-1.0).
DIFFUSERS_CONFIGS = {
    "dc-ae-f32c32-in-1.0": dc_config(32, 32, (128, 256, 512, 512, 1024, 1024), (0, 4, 8, 2, 2, 2)),
    "tiny-f32c8": dc_config(8, 8, (16, 16, 32, 32, 32, 32), (0, 1, 1, 1, 1, 1)),
}


def diffusers_autoencoder(encoder: str, seed: int = 0):
    """A random diffusers AutoencoderDC whose encoder has the layout of dcssdae preset `encoder`."""
    from diffusers import AutoencoderDC

    config = DIFFUSERS_CONFIGS[encoder]
    torch.manual_seed(seed)
    return AutoencoderDC(
        **config, decoder_block_out_channels=config["encoder_block_out_channels"],
        decoder_layers_per_block=config["encoder_layers_per_block"],
        decoder_block_types=config["encoder_block_types"], decoder_qkv_multiscales=config["encoder_qkv_multiscales"],
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle").eval()


def rate(fn, images: int) -> float:
    start = time.perf_counter()
    fn()
    return images / (time.perf_counter() - start)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="dc-ae-f32c32-in-1.0", choices=sorted(DIFFUSERS_CONFIGS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="decoding processes of `dcssdae latents`")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the settings and figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "folder", args.images, 500, 375)
        items, classes = list_folder(tmp / "folder")
        manifest = write_shards(items, tmp / "shards", "img", max(1, args.images // 4), classes, progress=False)
        shards = [str(tmp / "shards" / name) for name in manifest["shards"]]

        reference = diffusers_autoencoder(args.encoder)
        reference.save_pretrained(tmp / "diffusers")
        ours = DCSSDAE(args.encoder, "tiny", encoder_pretrained=str(tmp / "diffusers")).eval().to(device)
        reference = reference.to(device)
        batches = [b["image"].to(device) for b in ValShards(shards, args.size, args.batch_size, 0, 1)]
        max_abs_diff = max((ours.posterior(x).mean - reference.encode(x).latent).abs().max().item()
                           for x in batches[:1])

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def loop(round_: int):
            encode_shards(ours, shards, tmp / f"latents{round_}", args.size, args.batch_size, workers=args.workers,
                          progress=False)
            sync()

        def network(fn):
            for x in batches:
                fn(x)
            sync()

        runs = {"dcssdae_latents": [], "diffusers_network": [], "dcssdae_network": []}
        network(lambda x: reference.encode(x[:1]).latent)  # warm-up of both networks
        network(lambda x: ours.posterior(x[:1]).mean)
        for round_ in range(args.rounds):
            runs["dcssdae_latents"].append(rate(lambda r=round_: loop(r), args.images))
            runs["diffusers_network"].append(rate(lambda: network(lambda x: reference.encode(x).latent),
                                                  args.images))
            runs["dcssdae_network"].append(rate(lambda: network(lambda x: ours.posterior(x).mean), args.images))
    best = {name: max(values) for name, values in runs.items()}
    result = {
        "commit": git_commit(),
        "config": f"none (random weights, the same in both: encoder {args.encoder}; decoder unused)",
        "command": "python benchmarks/bench_encode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "device_name": torch.cuda.get_device_name(device)
                     if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"},
        "images_per_s": best,
        "rounds": runs,
        "ratio": best["dcssdae_latents"] / best["diffusers_network"],
        "network_ratio": best["dcssdae_network"] / best["diffusers_network"],
        "max_abs_diff": max_abs_diff,
    }
    print(f"{args.encoder} at {args.size} px, batch {args.batch_size}, {args.images} images on {args.device}: "
          + ", ".join(f"{name} {value:.3g} img/s" for name, value in best.items())
          + f"; dcssdae latents / diffusers network = {result['ratio']:.3f}, networks {result['network_ratio']:.3f}"
          f"; same weights: max |z_ours - z_diffusers| = {max_abs_diff:.2e}")
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
