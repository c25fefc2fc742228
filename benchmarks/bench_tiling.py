"""Tiled coding of large images (dcssdae.tiling): peak memory, agreement with untiled coding, and a seam picture.

    python benchmarks/bench_tiling.py memory                    # 2048 x 2048 tiled one-step decode, peak RSS (CPU)
    python benchmarks/bench_tiling.py agreement                 # tiled vs untiled reconstructions of 512 px images
    python benchmarks/bench_tiling.py agreement --model EXPORT_OR_CKPT [--images a.jpg b.png ...]
    python benchmarks/bench_tiling.py picture --model EXPORT_OR_CKPT --image photo.jpg --out docs/tiling_seams.png

* memory: builds the autoencoder (`--preset quickstart`: the decoder of configs/quickstart.yaml, `S`: the S decoder
  with the f32c32 encoder; random weights, speed and memory do not depend on them), draws a random latent for a
  SIDE x SIDE image, enables tiling and decodes it with one step, in a child process per setting; reports the
  child's peak resident set size (whole process: Python, torch, weights, the image) and the time.
* agreement: reconstructs SIDE x SIDE images (short side resized, centre crop) with and without tiling from the same
  noise and reports PSNR(tiled, untiled) and, for each, PSNR against the input (8-bit, as dcssdae.metrics). Without
  --model the quick-start-size network with randomly perturbed weights is used (an agreement stress test only:
  its reconstructions are noise) and the images are scikit-image's sample photos.
* picture: input | untiled | tiled | 8 x |tiled - untiled| side by side (PNG, written atomically), to look for
  seams; the tile borders are where they would be.
`--json PATH` writes the rows (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

QUICKSTART = {  # configs/quickstart.yaml, model init_args that shape the network
    "encoder": "tiny-f32c8",
    "encoder_overrides": {"latent_channels": 16, "widths": [16, 32, 64, 128, 128], "depths": [0, 1, 1, 1, 1],
                          "block_types": ["ResBlock", "ResBlock", "ResBlock", "EViT", "EViT"],
                          "attention_head_dim": 32, "double_latent": True},
    "decoder": "tiny",
    "decoder_overrides": {"channels": 32},
}
PRESETS = {"quickstart": QUICKSTART, "S": {"encoder": "dc-ae-f32c32-in-1.0", "decoder": "S",
                                           "encoder_overrides": {"double_latent": True}}}


def build(preset: str, seed: int = 0, perturb: bool = False):
    from dcssdae.autoencoder import DCSSDAE

    torch.manual_seed(seed)
    model = DCSSDAE(**PRESETS[preset]).eval()
    if perturb:  # zero-initialised output layers would make every decode equal the noise
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def load(path: str | None, preset: str):
    if path is None:
        return build(preset, perturb=True)
    from dcssdae.autoencoder import DCSSDAE

    return DCSSDAE.from_pretrained(path).eval()


def psnr(a_u8: torch.Tensor, b_u8: torch.Tensor) -> float:
    from dcssdae.metrics import psnr_uint8

    return float(psnr_uint8(a_u8[None], b_u8[None])[0][0])


def to_u8(x: torch.Tensor) -> torch.Tensor:
    from dcssdae.metrics import quantize_uint8

    return quantize_uint8(x.float().clamp(-1, 1))


def read_images(files: list[str] | None, side: int) -> list[tuple[str, torch.Tensor]]:
    """[(name, (3, side, side) in [-1, 1])]: files, or scikit-image's sample photos."""
    import numpy as np
    from PIL import Image

    from dcssdae.data import val_transform

    if files:
        pictures = [(Path(f).name, Image.open(f).convert("RGB")) for f in files]
    else:
        from skimage import data

        pictures = [(name, Image.fromarray(getattr(data, name)()).convert("RGB"))
                    for name in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for name, img in pictures:
        x = torch.from_numpy(np.array(val_transform(img, side))).permute(2, 0, 1).float() / 127.5 - 1
        out.append((name, x))
    return out


def reconstruct_both(model, x: torch.Tensor, tile: int, overlap: int, steps: int, seed: int):
    """(untiled, tiled) reconstructions of x (1, 3, H, W) from the same noise."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.disable_tiling()
        whole = model.reconstruct(x, noise=noise, steps=steps)
        model.enable_tiling(tile, overlap)
        tiled = model.reconstruct(x, noise=noise, steps=steps)
        model.disable_tiling()
    return whole, tiled


# ----------------------------------------------------------------------------------------------------------------


def run_memory_child(args) -> dict:
    """In a fresh process: tiled one-step decode of a SIDE x SIDE image; peak RSS of this process."""
    torch.set_num_threads(args.threads)
    model = build(args.preset)
    f = model.downsample_factor
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    z = torch.randn(1, model.latent_channels, args.side // f, args.side // f, generator=torch.Generator().manual_seed(0))
    if args.tile:
        model.enable_tiling(args.tile, args.overlap)
    start = time.perf_counter()
    with torch.no_grad():
        x = model.decode(z, steps=1, generator=torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - start
    assert x.shape == (1, 3, args.side, args.side) and torch.isfinite(x).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"preset": args.preset, "side": args.side, "tile": args.tile, "overlap": args.overlap,
            "threads": args.threads, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3),
            "rss_after_build_gib": round(rss_model / 2**30, 3)}


def main_memory(args) -> list[dict]:
    rows = []
    for tile in args.tiles:
        cmd = [sys.executable, __file__, "memory", "--child", "--preset", args.preset, "--side", str(args.side),
               "--tiles", str(tile), "--overlap", str(args.overlap), "--threads", str(args.threads)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode:
            print(result.stderr[-2000:], file=sys.stderr)
            rows.append({"preset": args.preset, "side": args.side, "tile": tile, "error": result.stderr[-300:]})
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{args.preset} decoder, {args.side} x {args.side}, tile {tile or 'none'} (overlap {args.overlap}), one "
              f"step, {args.threads} thread(s): peak RSS {row['peak_rss_gib']:.2f} GiB (after building the model "
              f"{row['rss_after_build_gib']:.2f} GiB), {row['seconds']:.0f} s")
    return rows


def main_agreement(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load(args.model, args.preset)
    rows = []
    for i, (name, x) in enumerate(read_images(args.images, args.side)):
        whole, tiled = reconstruct_both(model, x[None], args.tile, args.overlap, args.steps, seed=i)
        x_u8, whole_u8, tiled_u8 = to_u8(x), to_u8(whole[0]), to_u8(tiled[0])
        row = {"image": name, "side": args.side, "tile": args.tile, "overlap": args.overlap, "steps": args.steps,
               "psnr_tiled_vs_untiled": psnr(tiled_u8, whole_u8), "psnr_untiled": psnr(whole_u8, x_u8),
               "psnr_tiled": psnr(tiled_u8, x_u8)}
        rows.append(row)
        print(f"{name}: PSNR tiled vs untiled {row['psnr_tiled_vs_untiled']:.2f} dB; vs input: untiled "
              f"{row['psnr_untiled']:.2f} dB, tiled {row['psnr_tiled']:.2f} dB "
              f"(difference {row['psnr_tiled'] - row['psnr_untiled']:+.2f} dB)")
    gap = [r["psnr_tiled"] - r["psnr_untiled"] for r in rows]
    print(f"PSNR gap tiled - untiled: mean {sum(gap) / len(gap):+.2f} dB, largest {max(gap, key=abs):+.2f} dB "
          f"({'random weights' if args.model is None else args.model})")
    return rows


def main_picture(args) -> list[dict]:
    from PIL import Image

    torch.set_num_threads(args.threads)
    model = load(args.model, args.preset)
    [(name, x)] = read_images([args.image], args.side)
    whole, tiled = reconstruct_both(model, x[None], args.tile, args.overlap, args.steps, seed=0)
    diff = ((tiled - whole).abs() * 8 / 2).clamp(0, 2) - 1  # 8 x |difference| on the [-1, 1] scale
    panels = torch.cat([to_u8(x), to_u8(whole[0]), to_u8(tiled[0]), to_u8(diff[0])], dim=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(panels.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, out)
    row = {"image": name, "side": args.side, "tile": args.tile, "overlap": args.overlap, "steps": args.steps,
           "psnr_tiled_vs_untiled": psnr(to_u8(tiled[0]), to_u8(whole[0])), "out": str(out)}
    print(f"{out}: input | untiled | tiled ({args.tile} px tiles, {args.overlap} px overlap) | 8 x |tiled - "
          f"untiled|; PSNR tiled vs untiled {row['psnr_tiled_vs_untiled']:.2f} dB")
    return [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory", help="peak RSS of a tiled one-step decode of a large image (CPU)")
    memory.add_argument("--side", type=int, default=2048)
    memory.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sides to measure (0: untiled)")
    memory.add_argument("--overlap", type=int, default=128)
    memory.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name, p in (("agreement", sub.add_parser("agreement", help="tiled vs untiled PSNR on SIDE px images")),
                    ("picture", sub.add_parser("picture", help="input | untiled | tiled | difference PNG"))):
        p.add_argument("--model", default=None, required=name == "picture",
                       help="export directory or .ckpt (default: random quick-start-size weights)")
        p.add_argument("--side", type=int, default=512 if name == "agreement" else 1024)
        p.add_argument("--tile", type=int, default=256)
        p.add_argument("--overlap", type=int, default=64)
        p.add_argument("--steps", type=int, default=1, help="sampler steps (1: the one-step decoder)")
        if name == "agreement":
            p.add_argument("--images", nargs="*", default=None, help="image files (default: scikit-image photos)")
        else:
            p.add_argument("--image", required=True)
            p.add_argument("--out", default="docs/tiling_seams.png")
    for p in sub.choices.values():
        p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--json", default=None, help="write the rows as JSON (atomically)")
    args = parser.parse_args(argv)
    if args.command == "memory" and args.child:
        args.tile = args.tiles[0]
        print(json.dumps(run_memory_child(args)))
        return 0
    rows = {"memory": main_memory, "agreement": main_agreement, "picture": main_picture}[args.command](args)
    if args.json:
        from dcssdae.atomic_files import write_json

        write_json({"command": args.command, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
