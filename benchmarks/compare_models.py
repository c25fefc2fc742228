"""Score several trained models and the bicubic baseline on the same held-out images; write a table and a picture.

    python benchmarks/compare_models.py \
        --model "phase 1=runs/cpu/phase1/checkpoints/last.ckpt" \
        --model "student, 1 step=runs/cpu/distill/checkpoints/last.ckpt@1" \
        --val-shards default --size 256 --out docs/cpu_recipe

Each `--model LABEL=PATH[@STEPS]` is a `.ckpt` from `dcssdae fit` (its EMA weights) or an export folder, decoded with
its configured sampler (`@STEPS` replaces the number of steps; `@1` alone is the one-step decoder; `@8,power=3`
also replaces sampler settings; `tile=128` and `overlap=64` among them evaluate the encoder and each decoder network
call on overlapping tiles instead, `DCSSDAE.enable_tiling`). Every model sees the same images and the same decoder
noise (fixed seed). The baseline is bicubic resampling at the first model's latent budget (`dcssdae.baselines`).
Writes OUT.json (every metric, per model), OUT.md (a Markdown table) and OUT.png (rows: images; columns: input, each
model, bicubic).

With `--draws N` (N >= 2) every model decodes each latent N times from independent noise (draw d uses seed
SEED + 1000 d + batch): its metrics are the means over the draws (rFID on a few images moves by 10 or more from one
noise draw to the next), the rFID of each draw is kept, and `spread` is the per-pixel standard deviation over the
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
from dcssdae.metrics import ReconstructionMetrics, format_table, quantize_uint8

COLUMNS = [("num_images", "images", "{:d}"), ("nfe", "NFE", "{:.0f}"), ("psnr", "PSNR dB", "{:.2f}"),
           ("ssim", "SSIM", "{:.3f}"), ("stlpips_alex", "ST-LPIPS Alex", "{:.3f}"),
           ("stlpips_vgg", "ST-LPIPS VGG", "{:.3f}"), ("stlpips", "ST-LPIPS mean", "{:.3f}"),
           ("rfid", "rFID (relative)", "{:.1f}"), ("rfid_draws", "rFID per draw", None),
           ("spread", "spread over draws", "{:.4f}")]


def swap_low_pass(x_hat: torch.Tensor, x: torch.Tensor, latent_channels: int, downsample_factor: int) -> torch.Tensor:
    """x_hat with its low frequencies (bicubic resampling at the latent budget) replaced by those of x, clamped."""
    def low(y):
        return bicubic_resample(y, latent_channels, downsample_factor)
    return (x_hat - low(x_hat) + low(x)).clamp(-1, 1)


def cell(value, fmt: str | None) -> str:
    if value is None:
        return "-"
    return " / ".join(f"{v:.1f}" for v in value) if fmt is None else fmt.format(value)


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
        cells = [cell(r.get(c[0]), c[2]) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_over_draws(rows: list[dict]) -> dict:
    """One model's metrics over its noise draws: the mean of every number, and with several draws each draw's
    rFID as `rfid_draws`."""
    if len(rows) == 1:
        return rows[0]
    out = {}
    for k, v in rows[0].items():
        values = [r[k] for r in rows]
        if isinstance(v, float) or (isinstance(v, int) and len(set(values)) > 1):
            out[k] = sum(float(x) for x in values) / len(values)
        else:  # counts that every draw shares (num_images), and anything that is not a number
            out[k] = v
    if "rfid" in rows[0]:
        out["rfid_draws"] = [float(r["rfid"]) for r in rows]
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
    parser.add_argument("--no-rfid", action="store_true")
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
    metrics: dict[tuple[str, int], ReconstructionMetrics] = {}  # (label, draw); bicubic has draw 0 only
    labels = [m[0] for m in models] + list(oracle.values())
    for key in [(label, d) for label in labels for d in range(args.draws)] + [("bicubic", 0)]:
        metrics[key] = ReconstructionMetrics(rfid=not args.no_rfid, lpips_variant=["stlpips_alex", "stlpips_vgg"],
                                             share_networks=next(iter(metrics.values()), None))  # one set of networks
    spread = {label: 0.0 for label, *_ in models}
    shown: dict[str, list[torch.Tensor]] = {label: [] for label in ["input", *(m[0] for m in models), "bicubic"]}
    seconds = {label: 0.0 for label, *_ in models}
    seen = 0
    with torch.no_grad():
        for batch_idx, batch in enumerate(dm.val_dataloader()):
            x = batch["image"]
            if args.limit is not None:
                x = x[: max(0, args.limit - seen)]
            if len(x) == 0:
                break
            noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + 1000 * d + batch_idx))
                      for d in range(args.draws)]
            outputs = {}
            for label, ae, steps, _, settings in models:
                start = time.perf_counter()
                z = ae.encode(x)
                draws = []
                for d, noise in enumerate(noises):
                    x_hat, nfe = ae.decode(z, noise=noise, steps=steps, return_nfe=True, **settings)
                    draws.append(x_hat.clamp(-1, 1))
                    metrics[label, d].update(draws[-1], x, nfe)
                    if oracle:
                        swapped = swap_low_pass(draws[-1], x, ae.latent_channels, ae.downsample_factor)
                        metrics[oracle[label], d].update(swapped, x, nfe)
                seconds[label] += (time.perf_counter() - start) / args.draws
                outputs[label] = draws[0]
                if args.draws > 1:  # per-pixel std over the draws in [0, 1] units, averaged per image, summed
                    spread[label] += (torch.stack(draws).float() / 2).std(dim=0).flatten(1).mean(1).sum().item()
            outputs["bicubic"] = baseline("bicubic", x, first.latent_channels, first.downsample_factor)
            metrics["bicubic", 0].update(outputs["bicubic"], x)
            for label, images in [("input", x), *outputs.items()]:
                shown[label].extend(images[: max(0, args.picture_rows - len(shown[label]))])
            seen += len(x)
            print(f"{seen} images", flush=True)

    results = {label: mean_over_draws([metrics[label, d].compute() for d in range(args.draws)])
               for label, *_ in models}
    for label, name in oracle.items():
        results[name] = mean_over_draws([metrics[name, d].compute() for d in range(args.draws)])
        results[name]["oracle_of"] = label
    results["bicubic"] = metrics["bicubic", 0].compute()
    for label, ae, steps, path, settings in models:
        results[label].update(source=path, steps=steps, sampler_settings=settings,
                              tiling=dataclasses.asdict(ae.tiling) if ae.tiling else None,
                              seconds_per_image=seconds[label] / max(seen, 1))
        if args.draws > 1:
            results[label]["spread"] = spread[label] / max(seen, 1)
    out = Path(args.out)
    write_json({"val_shards": args.val_shards, "size": args.size, "seed": args.seed, "draws": args.draws,
                "models": results},
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
