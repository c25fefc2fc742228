"""Score several trained models and the bicubic baseline on the same held-out images; write a table and a picture.

    python benchmarks/compare_models.py \
        --model "phase 1=runs/cpu/phase1/checkpoints/last.ckpt" \
        --model "student, 1 step=runs/cpu/distill/checkpoints/last.ckpt@1" \
        --val-shards default --size 256 --out docs/cpu_recipe

Each `--model LABEL=PATH[@STEPS]` is a `.ckpt` from `dcssdae fit` (its EMA weights) or an export folder, decoded with
its configured sampler (`@STEPS` replaces the number of steps; `@1` alone is the one-step decoder; `@8,power=3`
also replaces sampler settings; `tile=128` and `overlap=64` among them evaluate the encoder and each decoder network
call on overlapping tiles instead, `DCSSDAE.enable_tiling`). Every model sees the same images and the same decoder
noise: image i's from (SEED, its key), as `dcssdae validate` draws it (`dcssdae.metrics.keyed_noise`). The baseline
is bicubic resampling at the first model's latent budget (`dcssdae.baselines`). Writes OUT.json (every metric, per
model), OUT.md (a Markdown table) and OUT.png (rows: images; columns: input, each model, bicubic).

The statistics are those of `dcssdae validate` (`dcssdae.metrics`): PSNR, SSIM, PSNR of 8 x 8 averages, ST-LPIPS
Alex and VGG, each with its 95% bootstrap interval over images; KID with its standard deviation over subsets; rFID
from `--rfid-min-images` images (default 2048; below, omitted: on a few photos it mostly measures their number).
Every column shares one set of metric networks and one pass of the references through Inception.

With `--draws N` (N >= 2) every model decodes each latent N times from independent noise (draw d: from (SEED, d, key)):
its metrics are the means over the draws, their intervals bootstrapped from each image's mean over the draws, KID
(and rFID) per draw kept as `kid_draws` (`rfid_draws`), and `spread` is the per-pixel standard deviation over the
draws ([0, 1] units, averaged over pixels and images): near 0 for a decoder that no longer samples. The picture shows
draw 0.

`--low-pass-oracle` adds, for every model, the row "LABEL + input low-pass": each decode with its low frequencies
(its bicubic resampling at the latent budget) replaced by the input's (`swap_low_pass`). Not a decoder (it reads
the input): it measures how much of a model's gap comes from low frequencies (colour, tone) rather than detail.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from dcssdae.atomic_files import write_json
from dcssdae.autoencoder import DCSSDAE
from dcssdae.baselines import baseline, bicubic_resample
from dcssdae.data import ImageNetDataModule
from dcssdae.metrics import FID_MIN_IMAGES, ReconstructionMetrics, format_table, keyed_noise, quantize_uint8
from dcssdae.set_statistics import bootstrap_ci

COLUMNS = [("num_images", "images", "{:d}"), ("nfe", "NFE", "{:.0f}"), ("psnr", "PSNR dB", "{:.2f}"),
           ("lowpass_psnr", "PSNR of 8x8 averages dB", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
           ("stlpips_alex", "ST-LPIPS Alex", "{:.3f}"), ("stlpips_vgg", "ST-LPIPS VGG", "{:.3f}"),
           ("stlpips", "ST-LPIPS mean", "{:.3f}"), ("kid", "KID +- std", "{:.4f}"), ("kid_draws", "KID per draw", None),
           ("rfid", "rFID", "{:.1f}"), ("rfid_draws", "rFID per draw", None),
           ("spread", "spread over draws", "{:.4f}")]


def swap_low_pass(x_hat: torch.Tensor, x: torch.Tensor, latent_channels: int, downsample_factor: int) -> torch.Tensor:
    """x_hat with its low frequencies (bicubic resampling at the latent budget) replaced by those of x, clamped."""
    def low(y):
        return bicubic_resample(y, latent_channels, downsample_factor)
    return (x_hat - low(x_hat) + low(x)).clamp(-1, 1)


def cell(row: dict, key: str, fmt: str | None) -> str:
    """A Markdown cell: the value, with its 95% interval [lo, hi] or (KID) its standard deviation."""
    value = row.get(key)
    if value is None:
        return "-"
    if fmt is None:  # per-draw lists
        return " / ".join(f"{v:.4f}" if abs(v) < 1 else f"{v:.1f}" for v in value)
    text = fmt.format(value)
    if key == "kid" and row.get("kid_std") is not None:
        text += " +- " + fmt.format(row["kid_std"])
    if isinstance(row.get(f"{key}_ci95"), list):
        text += " [" + ", ".join(fmt.format(v) for v in row[f"{key}_ci95"]) + "]"
    return text


def parse_model(spec: str) -> tuple[str, str, int | None, dict]:
    """"LABEL=PATH[@STEPS[,KEY=VALUE...]]" -> (label, path, steps or None, sampler settings), e.g.
    "teacher=runs/cpu/phase3/checkpoints/last.ckpt@8,power=3" (values read as YAML scalars)."""
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"--model wants LABEL=PATH[@STEPS[,KEY=VALUE...]], got {spec!r}")
    label, path = spec.split("=", 1)
    steps, settings = None, {}
    if "@" in path:
        path, text = path.rsplit("@", 1)
        text, *pairs = text.split(",")
        try:
            steps = int(text)
            for pair in pairs:
                key, value = (part.strip() for part in pair.split("=", 1))
                settings[key] = yaml.safe_load(value)
                if not key or settings[key] is None:
                    raise ValueError(f"{pair!r} needs a name and a value")
        except (ValueError, yaml.YAMLError) as error:
            raise argparse.ArgumentTypeError(f"--model {spec!r}: after '@' put STEPS[,KEY=VALUE...] ({error})")
    return label.strip(), path.strip(), steps, settings


def markdown(results: dict[str, dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in results.items():
        cells = [cell(r, c[0], c[2]) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("[lo, hi]: 95% bootstrap interval over images; KID +- its standard deviation over subsets.")
    return "\n".join(lines)


def mean_over_draws(metrics: ReconstructionMetrics, columns: list[str]) -> dict:
    """One model's metrics over its noise draws (the columns `columns`, one per draw): the mean of every number,
    intervals bootstrapped from each image's mean over the draws, and with several draws each draw's KID and rFID as
    `kid_draws` and `rfid_draws`."""
    rows = [metrics.compute(c) for c in columns]
    if len(rows) == 1:
        return rows[0]
    out = {}
    for k, v in rows[0].items():
        values = [r.get(k) for r in rows]
        if isinstance(v, float) or (isinstance(v, int) and len(set(values)) > 1):
            out[k] = sum(float(x) for x in values) / len(values)
        else:  # counts that every draw shares (num_images), intervals (below), text
            out[k] = v
    draws = [metrics.per_image(c)[0] for c in columns]  # the same images, in key order, in every draw
    for name in [k.removesuffix("_ci95") for k in rows[0] if k.endswith("_ci95")]:
        mean = torch.stack([d[name] for d in draws]).mean(dim=0)
        out[f"{name}_ci95"] = bootstrap_ci(mean, metrics.bootstrap_samples, seed=metrics.seed)
    for name in ("kid", "rfid"):
        if name in rows[0]:
            out[f"{name}_draws"] = [float(r[name]) for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=parse_model, required=True,
                        help="LABEL=PATH[@STEPS[,KEY=VALUE...]]")
    parser.add_argument("--val-shards", default="default", help="shards to score (default: the dev photos; "
                        "'default:crops' = 216 views of them, 'default:test' = the test photos)")
    parser.add_argument("--size", type=int, default=256, help="image side (short side resized, centre crop)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--limit", type=int, default=None, help="score at most this many images")
    parser.add_argument("--no-rfid", action="store_true", help="no rFID and no KID (no Inception)")
    parser.add_argument("--rfid-min-images", type=int, default=FID_MIN_IMAGES,
                        help="report rFID from this many images (default: the feature dimension, %(default)s)")
    parser.add_argument("--picture-rows", type=int, default=6, help="images shown in OUT.png")
    parser.add_argument("--picture-size", type=int, default=192, help="side of each image in OUT.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoder noise")
    parser.add_argument("--draws", type=int, default=1, help="decodes of each latent from independent noise; "
                        ">= 2 reports the mean over draws, each draw's rFID and the spread")
    parser.add_argument("--low-pass-oracle", action="store_true", help="also score each decode with the input's "
                        "low frequencies swapped in (a diagnostic, not a decoder)")
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")

    models = []
    for label, path, steps, settings in args.model:
        ae = DCSSDAE.from_pretrained(path).eval()
        tiling = {key: settings.pop(key) for key in ("tile", "overlap") if key in settings}
        if tiling:
            ae.enable_tiling(**tiling)
        models.append((label, ae, steps, path, settings))
    for label, ae, steps, _, settings in models:  # an unknown setting fails here, before any image is decoded
        ae.sampler_settings(steps, **settings)
    first = models[0][1]
    dm = ImageNetDataModule(val_shards=args.val_shards, train_shards="default", image_size=args.size,
                            val_batch_size=args.batch, num_workers=0)
    dm.setup("validate")
    oracle = {m[0]: f"{m[0]} + input low-pass" for m in models} if args.low_pass_oracle else {}
    # One table: every (label, draw) column and bicubic share the networks and the references' Inception pass.
    metrics = ReconstructionMetrics(rfid=not args.no_rfid, lpips_variant=["stlpips_alex", "stlpips_vgg"],
                                    rfid_min_images=args.rfid_min_images)

    def column(label: str, draw: int) -> str:
        return label if draw == 0 else f"{label} (draw {draw})"

    spread = {label: 0.0 for label, *_ in models}
    shown: dict[str, list[torch.Tensor]] = {label: [] for label in ["input", *(m[0] for m in models), "bicubic"]}
    seconds = {label: 0.0 for label, *_ in models}
    seen = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            x, keys = batch["image"], list(batch["key"])
            if args.limit is not None:
                x, keys = x[: max(0, args.limit - seen)], keys[: max(0, args.limit - seen)]
            if len(x) == 0:
                break
            noises = [keyed_noise(x, keys, args.seed, draw=d) for d in range(args.draws)]
            outputs = {}
            for label, ae, steps, _, settings in models:
                start = time.perf_counter()
                z = ae.encode(x)
                draws = []
                for d, noise in enumerate(noises):
                    x_hat, nfe = ae.decode(z, noise=noise, steps=steps, return_nfe=True, **settings)
                    draws.append(x_hat.clamp(-1, 1))
                    metrics.update(draws[-1], x, nfe, column=column(label, d), keys=keys)
                    if oracle:
                        swapped = swap_low_pass(draws[-1], x, ae.latent_channels, ae.downsample_factor)
                        metrics.update(swapped, x, nfe, column=column(oracle[label], d), keys=keys)
                seconds[label] += (time.perf_counter() - start) / args.draws
                outputs[label] = draws[0]
                if args.draws > 1:  # per-pixel std over the draws in [0, 1] units, averaged per image, summed
                    spread[label] += (torch.stack(draws).float() / 2).std(dim=0).flatten(1).mean(1).sum().item()
            outputs["bicubic"] = baseline("bicubic", x, first.latent_channels, first.downsample_factor)
            metrics.update(outputs["bicubic"], x, column="bicubic", keys=keys)
            for label, images in [("input", x), *outputs.items()]:
                shown[label].extend(images[: max(0, args.picture_rows - len(shown[label]))])
            seen += len(x)
            print(f"{seen} images", flush=True)

    results = {label: mean_over_draws(metrics, [column(label, d) for d in range(args.draws)])
               for label, *_ in models}
    for label, name in oracle.items():
        results[name] = mean_over_draws(metrics, [column(name, d) for d in range(args.draws)])
        results[name]["oracle_of"] = label
    results["bicubic"] = metrics.compute("bicubic")
    for label, ae, steps, path, settings in models:
        results[label].update(source=path, steps=steps, sampler_settings=settings,
                              tiling=dataclasses.asdict(ae.tiling) if ae.tiling else None,
                              seconds_per_image=seconds[label] / max(seen, 1))
        if args.draws > 1:
            results[label]["spread"] = spread[label] / max(seen, 1)
    out = Path(args.out)
    write_json({"val_shards": args.val_shards, "size": args.size, "seed": args.seed, "draws": args.draws,
                "rfid_min_images": args.rfid_min_images, "models": results},
               out.with_suffix(".json"))
    table = markdown(results)
    out.with_suffix(".md").write_text(table + "\n")
    print(format_table(results[models[0][0]], {k: v for k, v in results.items() if k != models[0][0]},
                       first=models[0][0]))
    print(table)

    # The picture: one row per image, one column per model.
    side = args.picture_size
    columns = list(shown)
    rows = len(shown["input"])
    sheet = Image.new("RGB", (side * len(columns), side * rows), "white")
    for c, label in enumerate(columns):
        for r, image in enumerate(shown[label]):
            array = quantize_uint8(image).permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(np.ascontiguousarray(array)).resize((side, side), Image.LANCZOS),
                        (c * side, r * side))
    sheet.save(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')} "
          f"(columns: {', '.join(columns)})")
    return 0 if all(math.isfinite(r.get("psnr", math.nan)) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
