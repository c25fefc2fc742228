"""`dcssdae latents`: encode an image WebDataset once into latent WebDataset shards, for training a latent diffusion
model (DiT, SiT, ...) on them (`dcssdae.data.LatentDataModule` reads them).

    dcssdae latents --model EXPORT_OR_CKPT --shards 'data/train/train-{000000..001281}.tar' --out latents/train --flip
    torchrun --nproc-per-node 8 -m dcssdae.cli latents --model ... --shards ... --out ...   # several GPUs / nodes

Preprocessing: that of validation (`dcssdae.images.val_transform`): the short side resized to --size (bicubic,
antialiased), the centre --size x --size crop, values in [-1, 1]; images that fail to decode are reported on stderr
(shard, key, reason), listed in the shard's record and in manifest.json, and left out.

Output, in --out DIR:
  NAME.tar          one per input shard, with the input shard's file name. One sample per image: `__key__` (the
                    source key), `cls` (class index as text, -1 unknown), `mean.npy` and `std.npy` (the posterior's
                    mean and standard deviation, C x h x w, float16 by default; std is zero for a deterministic
                    encoder) and, with --flip, `mean_flip.npy` / `std_flip.npy` of the mirrored image.
  parts/NAME.json   the shard's record: its source, a fingerprint of the settings (model file, source file, size,
                    flip, dtype, precision), image count, skipped images and per-channel moments of the latent.
  manifest.json     {"format", "shards": {NAME: count}, "total", "skipped", "classes", settings}.
  stats.json        `count` (images), `scaling_factor`, `shift_factor`, `channel_mean`, `channel_std`, the pooled
                    `mean` / `std`, `latent_shape` ...: statistics of the posterior means of the images (not of
                    their mirror images), in the convention of `dcssdae latent-stats` and of the diffusers export
                    (`AutoencoderDCSSD`): z_scaled = (z - shift_factor) * scaling_factor, scaling_factor = 1 / std
                    (all channels and positions pooled), shift_factor = 0 (or the mean with --shift).

Each shard is written to a temporary file and renamed when complete (`dcssdae.atomic_files.atomic_file`), then its
record; a rerun skips every shard whose file and record exist with the same fingerprint, so an interrupted run
resumes and a second run rewrites nothing. Ranks (torchrun's RANK / WORLD_SIZE, or an initialised
torch.distributed) take input shards i with i % WORLD_SIZE == RANK, each on its own GPU (LOCAL_RANK); the records
are gathered over torch.distributed (gloo) and rank 0 writes manifest.json and stats.json. Started without a process
group (RANK / WORLD_SIZE set by a job array, a shared file system), the rank that finds every record written
writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dcssdae.atomic_files import atomic_file, finite_or_none, write_json
from dcssdae.datasets import (
    _local_path,
    _sample_to_image,
    _worker,
    collate,
    expand_urls,
    manifest_classes,
    read_shard,
    shard_counts,
)
from dcssdae.images import ImageDecodeError, val_transform
from dcssdae.shards import _add

FORMAT = "dcssdae-latents/1"
PREPROCESSING = ("validation: short side resized to SIZE (bicubic, antialiased), centre SIZE x SIZE crop, "
                 "values in [-1, 1]")
CONVENTION = "z_scaled = (z - shift_factor) * scaling_factor; z = z_scaled / scaling_factor + shift_factor"


# ------------------------------------------------------------------------------------------------
# Per-channel moments, merged with Chan et al.'s pairwise update ("Updating formulae and a pairwise algorithm for
# computing sample variances", 1979: mean and sum of squared deviations), exact where E[z^2] - E[z]^2 cancels.


def channel_moments(z: torch.Tensor) -> dict:
    """{"n": values per channel, "mean": [C], "m2": [C]} of latents (B, C, h, w), in float64."""
    values = z.double().transpose(0, 1).flatten(1)  # (C, B*h*w)
    mean = values.mean(1)
    return {"n": values.shape[1], "mean": mean.tolist(), "m2": (values - mean[:, None]).square().sum(1).tolist()}


def merge_moments(a: dict | None, b: dict) -> dict:
    """The moments of the union of two sets (Chan et al.); `a` None is the empty set."""
    if a is None or a["n"] == 0:
        return b
    if b["n"] == 0:
        return a
    n = a["n"] + b["n"]
    mean_a, mean_b = np.array(a["mean"]), np.array(b["mean"])
    delta = mean_b - mean_a
    mean = mean_a + delta * b["n"] / n
    m2 = np.array(a["m2"]) + np.array(b["m2"]) + delta**2 * a["n"] * b["n"] / n
    return {"n": n, "mean": mean.tolist(), "m2": m2.tolist()}


def latent_stats(moments: dict, count: int, shift: bool) -> dict:
    """stats.json's numbers from the merged per-channel moments of `count` images (see the module docstring)."""
    n, mean, m2 = moments["n"], np.array(moments["mean"]), np.array(moments["m2"])
    pooled = None
    for c in range(len(mean)):  # all channels and positions pooled: the channels as sets of n values each
        pooled = merge_moments(pooled, {"n": n, "mean": [mean[c]], "m2": [m2[c]]})
    std = float(np.sqrt(pooled["m2"][0] / pooled["n"]))
    if not std > 0:
        raise ValueError(f"the latents have standard deviation {std}: cannot scale them")
    return {"count": count, "scaling_factor": 1.0 / std, "shift_factor": pooled["mean"][0] if shift else 0.0,
            "mean": pooled["mean"][0], "std": std, "channel_mean": mean.tolist(),
            "channel_std": np.sqrt(m2 / n).tolist(), "num_values": pooled["n"], "convention": CONVENTION}


# ------------------------------------------------------------------------------------------------
# Reading: whole input shards, split over DataLoader workers, as batches of one shard each.


class ShardImages(IterableDataset):
    """Batches of validation-preprocessed images, one input shard after another; worker w of W reads the shards
    `jobs[w::W]`. Each batch is {"shard": index, "image", "label", "key", "bad": [{"key", "reason"}], "last"}; the
    last batch of a shard has last=True (and image None when no image of it was left)."""

    def __init__(self, jobs: list[tuple[int, str]], size: int, batch_size: int):
        self.jobs, self.size, self.batch_size = jobs, size, batch_size

    def __iter__(self):
        worker, num_workers, _ = _worker()
        for index, url in self.jobs[worker::num_workers]:
            yield from self._shard(index, url)

    def _shard(self, index: int, url: str):
        images, labels, keys, bad = [], [], [], []

        def on_error(error: Exception) -> bool:  # unreadable tar data: the rest of the shard is lost
            bad.append({"key": None, "reason": f"unreadable shard data: {type(error).__name__}: {error}"})
            return True

        def batch(last: bool) -> dict:
            out = collate(images, labels, keys) if images else {"image": None, "label": None, "key": []}
            return {**out, "shard": index, "bad": list(bad), "last": last}

        for sample in read_shard(url, handler=on_error):
            try:
                img, label = _sample_to_image(sample)
            except (ImageDecodeError, ValueError) as error:
                bad.append({"key": sample.get("__key__"), "reason": str(error)})
                continue
            images.append(val_transform(img, self.size))
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield batch(last=False)
                images, labels, keys, bad = [], [], [], []
        yield batch(last=True)


# ------------------------------------------------------------------------------------------------
# Writing: one latent shard per input shard, atomically, then its record.


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class LatentShardWriter:
    """An output shard being written: a temporary file (`atomic_file`) holding a tar; `close()` renames it into
    place and returns the shard's record."""

    def __init__(self, path: Path, source: str, fingerprint_: str):
        self.path, self.source, self.fingerprint = path, source, fingerprint_
        self.stack = contextlib.ExitStack()
        file = self.stack.enter_context(atomic_file(path, "wb"))
        tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by the stack)
        self.tar = self.stack.enter_context(tar)
        self.count, self.skipped, self.moments, self.latent_shape = 0, [], None, None

    def add(self, key: str, label: int, arrays: dict[str, np.ndarray]) -> None:
        _add(self.tar, f"{key}.cls", str(label).encode())
        for name, array in arrays.items():
            _add(self.tar, f"{key}.{name}.npy", npy_bytes(array))
        self.count, self.latent_shape = self.count + 1, list(arrays["mean"].shape)

    def close(self) -> dict:
        self.stack.close()
        return {"format": FORMAT, "name": self.path.name, "source": self.source, "fingerprint": self.fingerprint,
                "count": self.count, "skipped": self.skipped, "latent_shape": self.latent_shape,
                "moments": self.moments}

    def abort(self) -> None:
        """Remove the temporary file (the shard's previous version, if any, stays)."""
        self.stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def fingerprint(settings: dict, model_path: str, url: str) -> str:
    """sha1 of what a latent shard depends on: the settings, the model's files and the source shard (path, size
    and modification time, as `dcssdae shards` fingerprints its inputs)."""
    def stat(path: Path) -> list:
        try:
            info = path.stat()
            return [str(path.resolve()), info.st_size, info.st_mtime_ns]
        except OSError:
            return [str(path)]

    model = Path(model_path)
    files = [model / "config.json", model / "model.safetensors"] if model.is_dir() else [model]
    source = _local_path(url)
    state = {**settings, "model": [stat(f) for f in files], "source": stat(source) if source else [url]}
    return hashlib.sha1(json.dumps(state, sort_keys=True).encode()).hexdigest()


def read_record(out: Path, name: str, fingerprint_: str) -> dict | None:
    """The record of a finished shard NAME (its file present, written with these settings), else None."""
    try:
        record = json.loads((out / "parts" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint_ or not (out / name).is_file():
        return None
    return record


# ------------------------------------------------------------------------------------------------
# The encode loop.


@torch.no_grad()
def encode_shards(
    model,
    urls: list[str],
    out: str | Path,
    size: int = 256,
    batch_size: int = 64,
    flip: bool = False,
    dtype: str = "float16",
    precision: str = "fp32",
    workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    model_path: str = "",
    progress: bool = True,
    report=None,
) -> dict[str, dict]:
    """Write the latent shards of this rank's input shards (`urls[rank::world_size]`) to `out`; return {name:
    record} of those shards, finished now or before (their files skipped).

    Args:
        model: a DCSSDAE (its `posterior`), on the device to encode on.
        urls: every input shard (all ranks); output names are their file names.
        size, flip, dtype: see `main` (--size, --flip, --dtype).
        precision: "fp32", or "bf16" / "fp16" autocast on CUDA.
        workers: DataLoader processes decoding images (0: in this process).
        model_path: the model's file or folder, for the fingerprint.
        report: called as report(shard url, key, reason) for each skipped image; default prints to stderr.
    """
    from tqdm import tqdm

    out = Path(out)
    names = output_names(urls)
    settings = settings_of(size, flip, dtype, precision)
    records, jobs = {}, []
    for index in range(rank, len(urls), world_size):
        fp = fingerprint(settings, model_path, urls[index])
        record = read_record(out, names[index], fp)
        if record is not None:
            records[names[index]] = record
        else:
            jobs.append((index, urls[index], fp))
    if not jobs:
        return records
    device = next(model.parameters()).device
    counts = shard_counts([url for _, url, _ in jobs])
    report = report or (lambda url, key, reason: tqdm.write(f"skipped {url}: {key}: {reason}", file=sys.stderr))
    dataset = ShardImages([(index, url) for index, url, _ in jobs], size, batch_size)
    num_workers = min(workers, len(jobs))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    autocast = (contextlib.nullcontext() if precision == "fp32" else
                torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]))
    store = np.dtype(dtype)
    by_index = {index: (url, fp) for index, url, fp in jobs}
    writers: dict[int, LatentShardWriter] = {}
    bar = tqdm(total=sum(counts) if counts else None, unit="img", desc=f"latents -> {out}",
               disable=not progress or rank != 0, dynamic_ncols=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    try:
        for batch in loader:
            index = batch["shard"]
            if index not in writers:
                writers[index] = LatentShardWriter(out / names[index], *by_index[index])
            writer = writers[index]
            for bad in batch["bad"]:
                report(writer.source, bad["key"], bad["reason"])
                writer.skipped.append(bad)
            if batch["image"] is not None:
                x = batch["image"].to(device, non_blocking=True)
                n = x.shape[0]
                with autocast:
                    posterior = model.posterior(torch.cat([x, x.flip(-1)]) if flip else x)  # (B or 2B, C, h, w)
                mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
                writer.moments = merge_moments(writer.moments, channel_moments(mean[:n]))  # of the images as given
                mean, std = mean.numpy().astype(store), std.numpy().astype(store)
                for i, (key, label) in enumerate(zip(batch["key"], batch["label"].tolist())):
                    arrays = {"mean": mean[i], "std": std[i]}
                    if flip:
                        arrays.update(mean_flip=mean[n + i], std_flip=std[n + i])
                    writer.add(key, label, arrays)
            bar.update(len(batch["key"]) + len(batch["bad"]))
            if batch["last"]:
                record = writers.pop(index).close()
                write_json(record, out / "parts" / f"{record['name']}.json")
                records[record["name"]] = record
    finally:
        for writer in writers.values():  # interrupted: no partial shard is left, earlier ones stay
            writer.abort()
        bar.close()
    return records


def output_names(urls: list[str]) -> list[str]:
    """The output shard names: each input shard's file name (they must differ)."""
    names = [url.rstrip("/").rsplit("/", 1)[-1] for url in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names):
        if name in seen:
            raise ValueError(f"input shards {seen[name]} and {url} have the same file name {name}: encode each "
                             "folder into its own --out")
        seen[name] = url
    return names


def settings_of(size: int, flip: bool, dtype: str, precision: str) -> dict:
    return {"format": FORMAT, "size": size, "flip": flip, "dtype": dtype, "precision": precision}


# ------------------------------------------------------------------------------------------------
# Finishing: manifest.json and stats.json from every shard's record.


def write_if_changed(tree: dict, path: Path) -> bool:
    """Write JSON atomically unless the file already holds the same; True when written."""
    try:
        if json.loads(path.read_text()) == json.loads(json.dumps(finite_or_none(tree))):
            return False
    except (OSError, ValueError):
        pass
    write_json(tree, path)
    return True


def finish(out: Path, urls: list[str], records: dict[str, dict], info: dict, shift: bool) -> dict | None:
    """Write manifest.json and stats.json when every shard has its record; return the stats (None if not)."""
    names = output_names(urls)
    missing = [name for name in names if name not in records]
    if missing:
        return None
    done = [records[name] for name in names]
    moments, count = None, sum(r["count"] for r in done)
    for record in done:
        if record["moments"] is not None:
            moments = merge_moments(moments, record["moments"])
    if moments is None:
        raise ValueError(f"no image of {info['shards']} could be read (every one was skipped; see "
                         f"{out / 'manifest.json'})")
    shape = next(r["latent_shape"] for r in done if r["latent_shape"])
    skipped = [{"shard": r["name"], **s} for r in done for s in r["skipped"]]
    manifest = {"format": FORMAT, **info, "complete": True, "total": count, "skipped_total": len(skipped),
                "latent_shape": shape, "shards": {r["name"]: r["count"] for r in done}, "skipped": skipped,
                "classes": manifest_classes(urls) or []}
    stats = {"format": FORMAT, **latent_stats(moments, count, shift), "latent_shape": shape, **info}
    write_if_changed(manifest, out / "manifest.json")
    write_if_changed(stats, out / "stats.json")
    extra = sorted({p.name for p in out.glob("*.tar")} - set(names))
    if extra:
        print(f"warning: {out} also holds {len(extra)} shard(s) not in this data set: {extra[:3]}", file=sys.stderr)
    return stats


# ------------------------------------------------------------------------------------------------
# Ranks: torchrun's environment or an initialised process group.


def rank_and_world() -> tuple[int, int, bool]:
    """(rank, world size, whether records are gathered over torch.distributed). A torchrun launch (WORLD_SIZE > 1
    and MASTER_ADDR set) starts a gloo process group for the records; RANK / WORLD_SIZE alone: no communication."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_ADDR" in os.environ and dist.is_available():
        # gloo: a few kilobytes of records; a rank whose shards were done long ago waits for the others
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return dist.get_rank(), dist.get_world_size(), True
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, False


def gather_records(records: dict[str, dict], out: Path, urls: list[str], settings: dict, model_path: str,
                   communicate: bool) -> dict[str, dict]:
    """Every rank's records: over torch.distributed, or (without a process group) read from out/parts."""
    if communicate:
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        return {name: record for part in gathered for name, record in part.items()}
    found = dict(records)
    for name, url in zip(output_names(urls), urls):
        if name not in found and (record := read_record(out, name, fingerprint(settings, model_path, url))):
            found[name] = record
    return found


def resolve_shards(shards: str) -> list[str]:
    """Shard URLs of a pattern, a list joined by "::", or "default" / "default:<split>" (the default photos)."""
    from dcssdae.data import _default_split

    split = _default_split(shards, "train") if shards.startswith("default") else None
    if split:
        from dcssdae.photos import ensure_default_photos

        shards = ensure_default_photos(splits=(split,))[split]
    urls = expand_urls(shards)
    missing = [u for u in urls if (p := _local_path(u)) is not None and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--shards {shards}: {len(missing)} of {len(urls)} shard file(s) not found, e.g. "
                                f"{missing[0]} (write shards with `dcssdae shards SRC OUT`)")
    return urls


# ------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae latents",
        description="Encode image WebDataset shards once into latent shards for training a latent diffusion model: "
        "per image its key, class, and the posterior mean.npy / std.npy (C x h x w), plus OUT/stats.json (count, "
        f"scaling_factor, shift_factor, channel_mean, channel_std). Preprocessing = {PREPROCESSING}. Bad images "
        "are reported and skipped; a rerun skips finished shards. Several GPUs / nodes: start it with torchrun "
        "(each rank encodes its own input shards).",
    )
    parser.add_argument("--model", required=True, help="export directory (`dcssdae export`) or .ckpt (`dcssdae fit`)")
    parser.add_argument("--shards", required=True, help="image shards: a brace pattern, a '::'-joined list, or "
                        "'default' / 'default:<split>' (the default photos)")
    parser.add_argument("--out", required=True, help="output folder for the latent shards, manifest.json, stats.json")
    parser.add_argument("--size", type=int, default=256,
                        help="image side after the validation resize + crop (default 256)")
    parser.add_argument("--flip", action="store_true", help="also store the latents of the mirrored image "
                        "(mean_flip.npy, std_flip.npy)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="of the stored arrays")
    parser.add_argument("--shift", action="store_true",
                        help="shift_factor = mean of the latents (SD3/FLUX convention; default 0 as DC-AE and SD)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="bf16 / fp16: autocast on CUDA (the stored arrays are --dtype either way)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images per rank (0: none)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from dcssdae.export import ToolError, load_model

    try:
        if args.size <= 0 or args.batch_size <= 0:
            raise ValueError(f"--size and --batch-size must be positive, got {args.size} and {args.batch_size}")
        urls = resolve_shards(args.shards)
        names = output_names(urls)
        started_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        rank, world, communicate = rank_and_world()
        started_group = started_group and communicate
        device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available()
                                 else "cpu")
        model = load_model(args.model, device)
        factor = model.downsample_factor
        if args.size % factor:
            raise ValueError(f"--size {args.size} is not a multiple of the model's downsample factor {factor}")
        if args.compile:
            model.encoder.compile(dynamic=False)
        out = Path(args.out)
        records = encode_shards(model, urls, out, args.size, args.batch_size, args.flip, args.dtype,
                                args.precision, args.workers, rank, world, args.model, not args.no_progress)
        settings = settings_of(args.size, args.flip, args.dtype, args.precision)
        records = gather_records(records, out, urls, settings, args.model, communicate)
        if started_group:
            torch.distributed.destroy_process_group()
        if communicate and rank != 0:
            return 0
        info = {**settings, "model": str(args.model), "shards": args.shards, "preprocessing": PREPROCESSING,
                "model_scaling_factor": model.latent_scale, "model_shift_factor": model.latent_shift}
        stats = finish(out, urls, records, info, args.shift)
    except (ToolError, ValueError, FileNotFoundError) as error:
        print(f"dcssdae latents: error: {error}", file=sys.stderr)
        return 2
    if stats is None:
        print(f"rank {rank}: wrote its shards; {sum(n not in records for n in names)} of {len(names)} shards still "
              f"missing (other ranks): stats.json is written by the rank that finishes last (or rerun)")
        return 0
    skipped = sum(len(r["skipped"]) for r in records.values())
    print(f"{stats['count']} images ({skipped} skipped) in {len(names)} shards, latents {stats['latent_shape']}: "
          f"{out}; mean {stats['mean']:.4g}, std {stats['std']:.4g} -> scaling_factor "
          f"{stats['scaling_factor']:.6g}, shift_factor {stats['shift_factor']:.6g} ({out / 'stats.json'})")
    return 0
