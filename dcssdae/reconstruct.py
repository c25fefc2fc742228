"""`dcssdae reconstruct`: image files through a trained model, OUT/<name>.png = input | reconstruction, and a PSNR
line per image."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dcssdae.export import ToolError, _device, load_model

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
