"""The GPU recipe rehearsed at full size on the CPU: every phase's real network, resolution and losses, a few steps
each, chained through `last.ckpt` as on a cluster; then export, validation and latent statistics. Reports the memory
and FLOPs each phase needs and projects them to one GPU at the config's batch (docs/training.md, "GPU recipe: memory,
FLOPs and time per phase").

    make rehearsal RUNS=runs         # = python benchmarks/rehearsal.py --out runs/rehearsal   -> report.json

The commands, run from the repository root, output in <out>/logs/<step>.log:
  1. ImageNet-layout folders (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of crops cut from the default photos (training
     photos for train, held-out ones for val), turned into shards by `dcssdae shards` as docs/training.md's "Data
     preparation" does (the val shards take the train manifest's class order).
  2. `dcssdae fit --config configs/phase1.yaml`, phase2.yaml and phase3.yaml, each with `--model.init_from` the
     previous phase's last.ckpt, then `make distill PHASE3_CKPT=<phase 3's last.ckpt> ARGS=...`. Only data paths,
     batch size (1), step count (2), precision (bf16-mixed, the configs' own), accelerator and devices (one CPU
     process, still under DDP), data-loader workers (0) and the run folder are overridden; each run also gets the
     measuring callback `benchmarks.rehearsal_probe.StepProbe`.
  3. `dcssdae export` of the distilled student, `dcssdae validate` of its checkpoint (the EMA weights, which are the
     export's; the `validate` entry of the report) and `dcssdae latent-stats` of the export.

LPIPS-VGG, LPIPS-AlexNet and DINOv2-B weights cannot be downloaded here: the rehearsal writes RANDOMLY INITIALISED
weight files in their real cache layout in a temporary folder and points TORCH_HOME / HF_HOME there for its own
commands only. It measures mechanics (shapes, checkpoints, memory, FLOPs), NOT quality: its losses and validation
metrics mean nothing. Real runs keep loading the real files (dcssdae/losses.py). glibc is told to serve large
allocations by mmap (MALLOC_MMAP_THRESHOLD_), so that a run's resident memory follows its live tensors.

What StepProbe measures is in benchmarks/rehearsal_probe.py. The projection to one GPU at the config's per-GPU batch
B (`project_memory`): fp32 weights of the autoencoder (and REPA's projector), of the frozen networks (LPIPS, DINOv2,
a distillation teacher, the validation metrics' Inception and AlexNet) and of the EMA copy; for the trained
parameters fp32 gradients, DDP's gradient buckets and AdamW's two moments; the saved tensors that do not grow with
the batch; and B x the saved activations per image. Time per optimiser step: flops_per_image x B x accumulated
micro-batches at a stated fraction of the H100's dense bf16 peak (989 TFLOP/s): 40%, and 16.6%, the fraction the
one measured phase-1 run reached (44 img/s, eager, ST-LPIPS-Alex in place of LPIPS-VGG: 3.73 TFLOP per image by this
count).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("phase1", "phase2", "phase3", "distill")
H100_BF16_FLOPS = 989e12            # H100 SXM dense bf16 peak (NVIDIA datasheet), FLOP/s
UTILISATION = 0.4                   # the stated fraction of it for the projection
# The one measured run: phase 1 on one H100, 44 img/s at 24 images (eager, bf16, ST-LPIPS-Alex for LPIPS-VGG), whose
# step counts 3.733 TFLOP per image here (phase 1's 3.855 - LPIPS-VGG's 0.160 + ST-LPIPS-Alex's 0.039, fwd + bwd).
MEASURED_UTILISATION = round(44 * 3.733e12 / H100_BF16_FLOPS, 3)
GPUS_PER_NODE = 8
PROBE_FILE = "rehearsal_probe.json"  # what StepProbe (benchmarks/rehearsal_probe.py) writes into each run folder
PROBE = "benchmarks.rehearsal_probe.StepProbe"
NEEDS_GIB = 10                      # peak resident memory of the rehearsal (9.5 GiB, phase 2 at 512 px), rounded up
BANNER = ("REHEARSAL: LPIPS-VGG, LPIPS-AlexNet and DINOv2 weights are RANDOM stand-ins; this measures mechanics, "
          "memory and FLOPs, NOT quality. Loss values and metrics below mean nothing.")


def standin_env(folder: Path) -> dict[str, str]:
    """The environment that points torchvision's and Hugging Face's caches at the stand-in weights in `folder`."""
    return {"TORCH_HOME": str(folder / "torch"), "HF_HOME": str(folder / "hf"),
            "HF_HUB_CACHE": str(folder / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------------------------
# A small ImageNet-layout data set cut from the default photos.



def held_out_split() -> str:
    """The default photos' split of held-out photos (never in a training shard): "dev", or "val" before it."""
    from dcssdae.photos import SPLITS

    return "dev" if "dev" in SPLITS else "val"


def write_imagenet_folders(root: Path, classes: int = 4, train_photos: int = 14, train_crops: int = 3,
                           val_crops: int = 1, seed: int = 0) -> dict[str, int]:
    """root/{train,val}/<wnid>/*.JPEG: `train_crops` random crops of each of the first `train_photos` default training
    photos, `val_crops` of each held-out photo, the photos dealt round-robin to `classes` made-up wnids. Crops keep
    the photo's resolution (60-100% of its short side, aspect 3:4 to 4:3), JPEG quality 90. Returns {split: images}."""
    from PIL import Image

    from dcssdae.photos import photo_items

    held_out = held_out_split()
    items = photo_items(("train", held_out))
    rng = random.Random(seed)
    wnids = [f"n{90000000 + i:08d}" for i in range(classes)]
    counts = {"train": 0, "val": 0}
    for split, photos, crops in (("train", items["train"][:train_photos], train_crops),
                                 ("val", items[held_out], val_crops)):
        for i, item in enumerate(photos):
            photo = Image.open(io.BytesIO(item.data)).convert("RGB")
            folder = root / split / wnids[i % classes]
            folder.mkdir(parents=True, exist_ok=True)
            for c in range(crops):
                side = rng.uniform(0.6, 1.0) * min(photo.size)
                aspect = rng.uniform(3 / 4, 4 / 3)
                w, h = min(photo.width, side * aspect ** 0.5), min(photo.height, side / aspect ** 0.5)
                left, top = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
                crop = photo.crop((round(left), round(top), round(left + w), round(top + h)))
                buf = io.BytesIO()
                crop.save(buf, "JPEG", quality=90)
                (folder / f"{item.key}_{c}.JPEG").write_bytes(buf.getvalue())
                counts[split] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Projection to a GPU.


def project_memory(probe: dict, batch: int, world_size: int = GPUS_PER_NODE) -> dict:
    """Bytes on one GPU at `batch` images per micro-batch (see the module docstring), each term by name, and their
    total. Weights, gradients, EMA and optimiser states in fp32 (Lightning's bf16-mixed keeps fp32 weights)."""
    memory = probe["memory_bytes"]
    terms = {
        "weights": memory["weights"],
        "frozen_networks": memory["frozen"],
        "ema": memory["ema"],
        "gradients": memory["trained"],
        "ddp_buckets": memory["trained"] if world_size > 1 else 0,
        "adamw_moments": 2 * memory["trained"],
        "saved_per_step": probe["saved_per_step_bytes"],
        "activations": batch * probe["saved_per_image_bytes"],
    }
    return {**terms, "total": sum(terms.values())}


# ----------------------------------------------------------------------------------------------------------------
# Configs (read as `dcssdae fit` composes them: `config:` parents first, nested settings merged).


def resolved_config(path: Path) -> dict:
    import yaml

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    settings = yaml.safe_load(path.read_text()) or {}
    parents = settings.pop("config", [])
    merged = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = merge(merged, resolved_config(path.parent / parent))
    return merge(merged, settings)


# ----------------------------------------------------------------------------------------------------------------
# Running the commands.


class Runner:
    """Runs each command of the rehearsal from the repository root, its output in <out>/logs/<name>.log; records
    its wall time and the CPU time (user + system) of the process and its children."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env, self.times, self.cpu = out, env, {}, {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, command: list[str]) -> float:
        log = self.out / "logs" / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log, "w") as f:
            f.write(" ".join(command) + "\n\n")
            f.flush()
            result = subprocess.run(command, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, check=False)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        self.times[name] = round(seconds, 1)
        self.cpu[name] = round(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, 1)
        if result.returncode != 0:
            tail = log.read_text().splitlines()[-40:]
            raise SystemExit(f"rehearsal: `{name}` failed (exit {result.returncode}; log {log}):\n" + "\n".join(tail))
        print(f"    {seconds:.0f} s, {self.cpu[name]:.0f} CPU s (log {log})", flush=True)
        return seconds


def commands(out: Path, train: str, val: str, args, py: str = sys.executable) -> list[tuple[str, list[str]]]:
    """(name, command line) of each step after the data: the four phases, export, validate, latent-stats. Each phase
    runs its config as the GPU user does; only data paths, batch size, step count, precision, accelerator, devices,
    data-loader workers and the run folder are overridden (plus `args.overlay` after the config, for tests)."""
    overlay = ["--config", str(Path(args.overlay).absolute())] if args.overlay else []
    overrides = ["--data.train_shards", train, "--data.val_shards", val, "--data.batch_size", str(args.batch),
                 "--data.val_batch_size", str(args.val_images), "--data.num_workers", "0",
                 "--trainer.max_steps", str(args.steps), "--trainer.precision", args.precision,
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                 f"--trainer.callbacks+={PROBE}"]
    cli = [py, "-m", "dcssdae.cli"]
    steps, previous = [], None
    for phase in PHASES:
        root = ["--trainer.default_root_dir", str(out / phase)]
        last = str(out / previous / "checkpoints" / "last.ckpt") if previous else None
        if phase == "distill":  # the README's step 4
            steps.append((phase, ["make", "--no-print-directory", "distill", f"PY={py}", f"PHASE3_CKPT={last}",
                                  "ARGS=" + shlex.join([*overlay, *overrides, *root])]))
        else:
            init = ["--model.init_from", last] if last else []
            steps.append((phase, [*cli, "fit", "--config", f"configs/{phase}.yaml", *overlay, *overrides, *init,
                                  *root]))
        previous = phase
    student, export = str(out / "distill" / "checkpoints" / "last.ckpt"), str(out / "export")
    steps.append(("export", [*cli, "export", student, export, "--overwrite"]))
    steps.append(("validate", [*cli, "validate", "--config", "configs/distill.yaml", *overlay, "--ckpt_path", student,
                               "--model.init_from", str(out / "phase3" / "checkpoints" / "last.ckpt"),
                               "--data.train_shards", train, "--data.val_shards", val,
                               "--data.val_batch_size", str(args.val_images), "--data.num_workers", "0",
                               "--trainer.precision", args.precision, "--trainer.accelerator", "cpu",
                               "--trainer.devices", "1", "--trainer.default_root_dir", str(out / "validate")]))
    steps.append(("latent_stats", [*cli, "latent-stats", export, "--data", val, "--num-images", str(args.val_images),
                                   "--size", "256", "--batch-size", "2", "--device", "cpu"]))
    return steps


def write_data(out: Path, run: Runner) -> tuple[str, str]:
    """The ImageNet-layout folders and their shards under out/data (kept between runs); (train, val) patterns."""
    data, py = out / "data", sys.executable
    if not (data / "shards" / "val" / "manifest.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        counts = write_imagenet_folders(data / "imagenet")
        print(f"ImageNet-layout folders: {counts['train']} train and {counts['val']} val images under "
              f"{data / 'imagenet'}", flush=True)
        run("shards_train", [py, "-m", "dcssdae.cli", "shards", str(data / "imagenet" / "train"),
                             str(data / "shards" / "train"), "--workers", "1", "--no-progress"])
        run("shards_val", [py, "-m", "dcssdae.cli", "shards", str(data / "imagenet" / "val"), str(data / "shards" / "val"),
                           "--classes", str(data / "shards" / "train" / "manifest.json"), "--workers", "1",
                           "--no-progress"])
    return tuple(str(data / "shards" / split / json.loads((data / "shards" / split / "manifest.json").read_text())
                     ["pattern"]) for split in ("train", "val"))


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 2**20 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/rehearsal", help="output folder (default runs/rehearsal)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per phase (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="images per training step (default 1)")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer precision (default bf16-mixed, the configs')")
    parser.add_argument("--val-images", type=int, default=6, help="validation batch and latent-stats images (default 6)")
    parser.add_argument("--overlay", help="a config given after each recipe config (tests: tiny networks)")
    parser.add_argument("--start-at", choices=[*PHASES, "export", "validate", "latent_stats"],
                        help="skip the steps before this one (their outputs under --out must exist)")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(BANNER, flush=True)
    available = _available_gib()
    if available is not None and available < NEEDS_GIB and not args.overlay:
        print(f"warning: {available:.1f} GiB of memory available; the full-size phases need ~{NEEDS_GIB} GiB",
              flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcssdae-rehearsal-weights-") as weights:
        env = {**os.environ, **standin_env(Path(weights)), "WANDB_MODE": "offline",
               "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "262144",
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        run = Runner(out, env)
        run("standin_weights", [sys.executable, "-m", "benchmarks.rehearsal_probe", "standins", weights])
        train, val = write_data(out, run)
        steps = commands(out, train, val, args)
        names = [name for name, _ in steps]
        for name, command in steps[names.index(args.start_at) if args.start_at else 0:]:
            if name in PHASES:
                shutil.rmtree(out / name, ignore_errors=True)
            run(name, command)
    report = write_report(out, run, args)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"\n{BANNER}\nreport: {out / 'report.json'}; {report['total_seconds'] / 60:.1f} min in all")
    return 0


def write_report(out: Path, run: Runner, args) -> dict:
    report = {"note": BANNER, "rehearsal": {"steps": args.steps, "batch": args.batch, "precision": args.precision,
                                            "device": "cpu", "overlay": args.overlay},
              "seconds": run.times, "cpu_seconds": run.cpu}
    for phase in PHASES:
        probe_file = out / phase / PROBE_FILE
        if not probe_file.is_file():
            continue
        probe = json.loads(probe_file.read_text())
        report[phase] = phase_entry(f"configs/{phase}.yaml", probe, args.steps)
    if "phase1" in report:
        probe = json.loads((out / "phase1" / PROBE_FILE).read_text())
        report["phase1_24gb"] = phase_entry("configs/phase1_24gb.yaml", probe, args.steps, budget_gib=24)
    metrics = sorted((out / "validate").rglob("validate_metrics.json"))
    if metrics:
        report["validate"] = json.loads(metrics[-1].read_text())
    export_config = out / "export" / "config.json"
    if export_config.is_file():
        report["latent_stats"] = json.loads(export_config.read_text()).get("export", {}).get("latent_stats")
    return report


def phase_entry(config_path: str, probe: dict, steps: int, budget_gib: float = 80.0) -> dict:
    config = resolved_config(ROOT / config_path)
    batch = int(config["data"]["batch_size"])
    accumulate = int(config["trainer"].get("accumulate_grad_batches") or 1)
    max_steps = int(config["trainer"]["max_steps"])
    memory = project_memory(probe, batch)
    step_s = probe["flops_per_image"] * batch * accumulate / (UTILISATION * H100_BF16_FLOPS)
    measured_s = step_s * UTILISATION / MEASURED_UTILISATION
    return {
        "config": config_path,
        "steps": steps,
        "params": probe["params"],
        "trainable_params": probe["trainable_params"],
        "image_size": probe["image_size"],
        "batch_size": batch,
        "accumulate_grad_batches": accumulate,
        "flops_per_image": probe["flops_per_image"],
        "peak_memory_mib": round(probe["peak_rss_delta_bytes"] / 2**20, 1) if probe["peak_rss_delta_bytes"] else None,
        "rehearsal_batch": probe["batch"],
        "saved_activations_mib_per_image": round(probe["saved_per_image_bytes"] / 2**20, 1),
        "projected_gpu_memory_gib": round(memory["total"] / 2**30, 2),
        "projected_gpu_memory_terms_gib": {k: round(v / 2**30, 2) for k, v in memory.items() if k != "total"},
        "gpu_memory_budget_gib": budget_gib,
        "fits": memory["total"] / 2**30 <= budget_gib,
        "projected_h100_step_s": round(step_s, 3),
        "h100_utilisation": UTILISATION,
        "max_steps": max_steps,
        "projected_recipe_hours": round(step_s * max_steps / 3600, 1),
        "measured_utilisation": MEASURED_UTILISATION,
        "projected_h100_step_s_at_measured_utilisation": round(measured_s, 3),
        "projected_recipe_hours_at_measured_utilisation": round(measured_s * max_steps / 3600, 1),
        "cpu_step_seconds": [step["seconds"] for step in probe["steps"]],
        "init_from": _init_summary(probe.get("init_from")),
    }


def _init_summary(report: dict | None) -> dict | None:
    """What init_from loaded: tensors loaded, and the names not loaded / not used (empty lists when all matched)."""
    if report is None:
        return None
    return {"loaded": report["loaded"], "missing": report["missing"], "unexpected": report["unexpected"]}


def format_report(report: dict) -> str:
    """The per-phase figures as a Markdown table (the one in docs/training.md)."""
    lines = [(f"| phase | parameters (trained) | px | images per GPU | GFLOP per image, fwd + bwd | CPU peak at batch "
             f"{report['rehearsal']['batch']}, MiB | saved activations per image, MiB | projected GiB per GPU "
             f"(budget) | H100 s per step at {UTILISATION:.0%} ({MEASURED_UTILISATION:.1%}) | steps | hours at "
             f"{UTILISATION:.0%} ({MEASURED_UTILISATION:.1%}) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for phase in (*PHASES, "phase1_24gb"):
        e = report.get(phase)
        if not e:
            continue
        batch = f"{e['batch_size']}" + (f" x {e['accumulate_grad_batches']}" if e["accumulate_grad_batches"] > 1 else "")
        lines.append(
            f"| {phase} | {e['params'] / 1e6:.1f} M ({e['trainable_params'] / 1e6:.1f} M) | {e['image_size']} | {batch} | "
            f"{e['flops_per_image'] / 1e9:,.0f} | {e['peak_memory_mib']:,.0f} | {e['saved_activations_mib_per_image']:,.0f} | "
            f"{e['projected_gpu_memory_gib']:.1f} ({e['gpu_memory_budget_gib']:.0f}) | {e['projected_h100_step_s']:.2f} "
            f"({e['projected_h100_step_s_at_measured_utilisation']:.2f}) | {e['max_steps']:,} | "
            f"{e['projected_recipe_hours']:.1f} ({e['projected_recipe_hours_at_measured_utilisation']:.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
