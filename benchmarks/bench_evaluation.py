"""Time of a validation table's metrics (model, one step, bicubic) before and after sharing: one process, same inputs.

    python benchmarks/bench_evaluation.py --threads 2 --json docs/bench/evaluation_shared_networks.json

Three ways to score the same three columns of reconstructions of the same images (default: the 8 dev photos at
256 px, the quick-start's validation set), each with rFID / KID Inception features and ST-LPIPS Alex and VGG:

- `per_column_networks`: each column with its own torchmetrics FrechetInceptionDistance (its own TF-Inception) and
  its own ST-LPIPS networks; the references through Inception once per column; rFID by torchmetrics (a 2048 x 2048
  non-symmetric eigendecomposition per column). What a table of independent metric objects costs.
- `per_column_statistics`: one Inception and one set of ST-LPIPS networks shared by the columns, but still a
  FrechetInceptionDistance per column (the references through Inception once per column, the eigendecomposition per
  column): `dcssdae.metrics` before this change.
- `shared`: `dcssdae.metrics.ReconstructionMetrics` with three columns: networks built once at the first batch, the
  references through Inception once per evaluation, Frechet statistics of the references once, rFID's trace term
  from a small SVD, plus what the old paths do not give (bootstrap intervals, KID, low-pass PSNR).

Per way: seconds to build the metric objects, seconds for the batches (networks built on first use included), and
seconds after the last batch (every column's compute): what `dcssdae validate` waits for once its last image is
decoded. Each as wall-clock seconds and as CPU seconds of this process (`*_cpu_s`, steadier on a shared machine);
with `--repeat N` the ways run N times in turn and the fastest run of each is kept. The reconstructions are fixed
stand-ins (the input with noise, blurred, bicubic at the f8c4 budget): the metrics' cost does not depend on the
decoder. rFID is computed by every way (the shared one with rfid_min_images 2,
only to compare it: `dcssdae validate` omits it below 2048 images) and must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dcssdae.baselines import bicubic_resample
from dcssdae.metric_networks import build_perceptual, inception_weights_path
from dcssdae.metrics import ReconstructionMetrics, psnr_uint8, quantize_uint8

VARIANTS = ["stlpips_alex", "stlpips_vgg"]


def load_images(shards: str, size: int, limit: int | None) -> tuple[torch.Tensor, list[str]]:
    from dcssdae.data import ImageNetDataModule

    dm = ImageNetDataModule(val_shards=shards, train_shards="default", image_size=size, val_batch_size=64,
                            num_workers=0)
    dm.setup("validate")
    images, keys = [], []
    for batch in dm.val_dataloader():
        images.append(batch["image"])
        keys += list(batch["key"])
    x = torch.cat(images)
    return (x, keys) if limit is None else (x[:limit], keys[:limit])


def columns_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stand-in reconstructions: three columns of a validation table."""
    g = torch.Generator().manual_seed(0)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return {"model": (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1), "1 step": blurred,
            "bicubic": bicubic_resample(x, 4, 8)}


class OldColumn:
    """One column the way separate torchmetrics objects score it: FrechetInceptionDistance (own or shared
    Inception), PSNR, SSIM and ST-LPIPS sums."""

    def __init__(self, inception, perceptual: dict) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        weights = None if inception is not None else str(inception_weights_path())
        self.fid = FrechetInceptionDistance(feature=2048 if inception is None else inception,
                                            feature_extractor_weights_path=weights, antialias=False)
        self.perceptual = perceptual
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        from torchmetrics.functional.image import structural_similarity_index_measure

        x_u8, x_hat_u8 = quantize_uint8(x), quantize_uint8(x_hat)
        x01, x_hat01 = x_u8.float() / 255, x_hat_u8.float() / 255
        values = {"psnr": psnr_uint8(x_hat_u8, x_u8)[0],
                  "ssim": structural_similarity_index_measure(x_hat01, x01, data_range=1.0, reduction="none")}
        for name, net in self.perceptual.items():
            values[name] = net(x_hat01 * 2 - 1, x01 * 2 - 1).flatten()
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + v.double().sum().item()
        self.count += len(x)
        self.fid.update(x_u8, real=True)
        self.fid.update(x_hat_u8, real=False)

    def compute(self) -> dict:
        return {**{k: v / self.count for k, v in self.sums.items()}, "rfid": float(self.fid.compute())}


class Clock:
    """Wall-clock and CPU seconds between marks."""

    def __init__(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def phases(self, names: tuple[str, ...] = ("build", "batches", "after_last_batch")) -> dict[str, float]:
        out = {}
        for name, (a, b) in zip(names, zip(self.marks, self.marks[1:])):
            out[f"{name}_s"], out[f"{name}_cpu_s"] = b[0] - a[0], b[1] - a[1]
        out["total_s"], out["total_cpu_s"] = (self.marks[-1][0] - self.marks[0][0],
                                              self.marks[-1][1] - self.marks[0][1])
        return out


def time_old(x: torch.Tensor, columns: dict, batch: int, share: bool) -> dict:
    clock = Clock()
    shared_perceptual = {name: build_perceptual(name)[1] for name in VARIANTS} if share else None
    first = OldColumn(None, shared_perceptual or {n: build_perceptual(n)[1] for n in VARIANTS})
    table = {"model": first}
    for name in list(columns)[1:]:
        table[name] = OldColumn(first.fid.inception if share else None,
                                shared_perceptual or {n: build_perceptual(n)[1] for n in VARIANTS})
    clock.mark()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            for name, x_hat in columns.items():
                table[name].update(x_hat[i:i + batch], x[i:i + batch])
    clock.mark()
    results = {name: column.compute() for name, column in table.items()}
    clock.mark()
    return {**clock.phases(), "results": results}


def time_shared(x: torch.Tensor, keys: list[str], columns: dict, batch: int) -> dict:
    clock = Clock()
    metrics = ReconstructionMetrics(rfid=True, lpips_variant=VARIANTS, rfid_min_images=2)
    clock.mark()
    for i in range(0, len(x), batch):
        for name, x_hat in columns.items():
            metrics.update(x_hat[i:i + batch], x[i:i + batch], column=name, keys=keys[i:i + batch])
    clock.mark()
    results = {name: metrics.compute(name) for name in columns}
    clock.mark()
    return {**clock.phases(), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="default", help="images to score (default: the dev photos)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=6, help="images per batch (the quick-start's val_batch_size)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="run the ways N times in turn; keep each one's fastest")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, keys = load_images(args.shards, args.size, args.limit)
    columns = columns_of(x)
    print(f"{len(x)} images of {args.size} px, columns {list(columns)}, {args.threads} threads", flush=True)
    ways: dict[str, dict] = {}
    runs = {"shared": lambda: time_shared(x, keys, columns, args.batch),
            "per_column_statistics": lambda: time_old(x, columns, args.batch, share=True),
            "per_column_networks": lambda: time_old(x, columns, args.batch, share=False)}
    for repeat in range(args.repeat):
        for name, run in runs.items():
            result = run()
            print(f"{name} (run {repeat}): " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()
                                                         if k.endswith("_s")), flush=True)
            if name not in ways or result["total_cpu_s"] < ways[name]["total_cpu_s"]:
                ways[name] = result
    new = ways["shared"]
    agree = {}
    for way in ("per_column_statistics", "per_column_networks"):
        for column in columns:
            old, ours = ways[way]["results"][column], new["results"][column]
            for metric in ("psnr", "ssim", "stlpips_alex", "stlpips_vgg", "rfid"):
                agree[metric] = max(agree.get(metric, 0.0), abs(old[metric] - ours[metric]) / max(abs(old[metric]),
                                                                                                  1e-12))
    ratios = {f"{way}_over_shared": {k: ways[way][k] / new[k] for k in ("after_last_batch_s", "after_last_batch_cpu_s",
                                                                       "total_s", "total_cpu_s")}
              for way in ("per_column_statistics", "per_column_networks")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {
        "what": "seconds to score a validation table of 3 columns (model, 1 step, bicubic) with rFID/KID Inception "
                "features and ST-LPIPS Alex + VGG, three ways, one process, same inputs",
        "command": "python benchmarks/bench_evaluation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit, "torch": torch.__version__, "threads": args.threads, "repeat": args.repeat,
        "cpu": platform.processor() or platform.machine(), "load_average_at_end": os.getloadavg(),
        "num_images": len(x), "size": args.size,
        "seconds": {way: {k: round(v, 2) for k, v in r.items() if k.endswith("_s")} for way, r in ways.items()},
        "ratios": {k: {m: round(v, 1) for m, v in r.items()} for k, r in ratios.items()},
        "max_relative_difference_vs_old": agree,
        "shared_result": new["results"],
    }
    print(json.dumps({k: report[k] for k in ("seconds", "ratios", "max_relative_difference_vs_old")}, indent=1))
    if args.json:
        from dcssdae.atomic_files import write_json

        write_json(report, args.json)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
