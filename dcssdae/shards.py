"""`dcssdae shards SRC OUT`: image folders or Hugging Face parquet files -> checked WebDataset tar shards.

Sources:
  * a folder: ImageNet layout (`train/<wnid>/*.JPEG`: the top-level folders are the classes, indexed in
    sorted order like torchvision's ImageFolder) or any tree of images (no top-level folders only, or
    `--no-labels`: class -1). Hidden files and folders are ignored; every other file is checked.
  * Hugging Face parquet files (`imagenet-1k`: `data/train-00000-of-00294.parquet`, ...): one or more
    files, or a folder holding them (`--split train` keeps the files whose name starts with "train").
    Columns `image` (struct of `bytes`, `path`) and `label`; class names come from the schema's
    Hugging Face metadata when present.

Each input is checked (zero-byte, not an image, corrupt, truncated: PIL open + verify + full decode with
`dcssdae.images.decode_image`, so every stored image decodes at training time). Bad inputs are reported
on stderr (path and reason), listed in the manifest and left out; they never stop the run.

Shard sample: `__key__` (the relative path without its extension, "/" and "." replaced by "_"), the
original bytes under the extension of the format PIL detects (`jpg`, `png`, `webp`, ...; not the file
name's), `cls` (class index as text, -1 if unknown) and `json` ({"source", "width", "height", "mode",
"format"}). Tar members have fixed owner and time, so a rerun writes byte-identical shards.

Assignment is deterministic: inputs sorted, shard i holds inputs [i * shard_size, (i + 1) * shard_size)
(minus the bad ones). Each shard is written under a temporary name and renamed when complete, and
`manifest.json` in OUT is rewritten after every shard:
  {"format", "source", "kind", "prefix", "shard_size", "pattern", "complete", "classes",
   "total", "inputs", "skipped_total", "shards": {name: count}, "fingerprints": {name: sha1},
   "skipped": [{"path", "reason", "shard"}]}
A rerun skips every shard whose file exists and whose fingerprint (inputs' names, sizes, times and
labels) matches the manifest; so an interrupted run resumes, and a changed input rewrites its shard.
Run one writer per OUT at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dcssdae.images import ImageDecodeError, decode_image

FORMAT = "dcssdae-shards/1"

# PIL format name -> shard extension (others: the format name in lower case).
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "PPM": "ppm",
    "JPEG2000": "jp2",
}

# ------------------------------------------------------------------------------------------------
# Inputs: one `Item` per image (folders, in-memory photos) or row ranges of parquet files.


@dataclass(frozen=True)
class Item:
    """One input image: its key, class index (-1 unknown), where it comes from, and maybe its bytes."""

    key: str
    label: int
    source: str  # a file path (read when `data` is None), or a description
    data: bytes | None = None
    meta: dict = field(default_factory=dict, compare=False)  # extra json metadata (e.g. licence)


def sanitize_key(name: str) -> str:
    """A webdataset key: no "." (the key ends at the first dot), no "/" and no whitespace."""
    return re.sub(r"[./\\\s]", "_", name)


def unique_keys(keys: Sequence[str], extensions: Sequence[str]) -> list[str]:
    """Make keys unique (deterministically) by appending the original extension, then a counter."""
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    out, used = [], set()
    for k, ext in zip(keys, extensions):
        key = k if seen[k] == 1 else f"{k}_{sanitize_key(ext.lstrip('.'))}"
        base, n = key, 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        out.append(key)
    return out


def list_folder(
    src: Path, classes: list[str] | None = None, labels: bool = True
) -> tuple[list[Item], list[str]]:
    """Every non-hidden file under `src` (sorted) as an Item; classes = top-level folders if labelled.

    Files are labelled when `labels` is set and every file lies inside a top-level folder (ImageNet
    layout); `classes` fixes the class order (e.g. the train manifest's, for the validation split).
    """
    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"image folder {src} does not exist")
    paths = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(root, f) for f in files if not f.startswith(".")]
    rel = sorted(p.relative_to(src).as_posix() for p in paths)
    labelled = labels and bool(rel) and all("/" in r for r in rel)
    if labelled:
        found = sorted({r.split("/", 1)[0] for r in rel})
        classes = list(classes) if classes else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"folders {unknown[:5]} of {src} are not among the {len(classes)} given classes")
    else:
        classes = list(classes or [])
    index = {name: i for i, name in enumerate(classes)}
    stems, exts = zip(*[os.path.splitext(r) for r in rel]) if rel else ((), ())
    keys = unique_keys([sanitize_key(s) for s in stems], exts)
    items = [Item(k, index[r.split("/", 1)[0]] if labelled else -1, str(src / r)) for k, r in zip(keys, rel)]
    return items, classes


@dataclass(frozen=True)
class ParquetRows:
    """Rows [start, stop) of the concatenated parquet row groups.

    `groups` = [(file, row group, its first row in the concatenation, its rows, its first row in the file)].
    """

    groups: tuple[tuple[str, int, int, int, int], ...]
    start: int
    stop: int
    image_column: str = "image"
    label_column: str = "label"

    def __len__(self) -> int:
        return self.stop - self.start

    def slice(self, start: int, stop: int) -> ParquetRows:
        groups = tuple(g for g in self.groups if g[2] < stop and g[2] + g[3] > start)
        return ParquetRows(groups, start, stop, self.image_column, self.label_column)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def list_parquet(
    sources: Sequence[Path],
    split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[ParquetRows, list[str]]:
    """Parquet files (given, or found under given folders; sorted) as one row range, plus class names."""
    pq = _pyarrow()
    files = []
    for s in map(Path, sources):
        files += sorted(s.rglob("*.parquet")) if s.is_dir() else [s]
    if split:
        files = [f for f in files if f.name.startswith(split)]
    if not files:
        raise FileNotFoundError(
            f"no parquet files in {[str(s) for s in sources]}" + (f" for split {split!r}" if split else "")
        )
    groups, offset, classes = [], 0, []
    for f in sorted(files):
        pf = pq.ParquetFile(f)
        if image_column not in pf.schema_arrow.names:
            raise ValueError(f"{f} has no column {image_column!r} (columns: {pf.schema_arrow.names})")
        classes = classes or _hf_class_names(pf.schema_arrow.metadata or {}, label_column)
        in_file = 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            groups.append((str(f), g, offset, rows, in_file))
            offset, in_file = offset + rows, in_file + rows
    return ParquetRows(tuple(groups), 0, offset, image_column, label_column), classes


def _hf_class_names(metadata: dict, label_column: str) -> list[str]:
    """Class names of a Hugging Face `ClassLabel` column, from the parquet schema metadata."""
    try:
        info = json.loads(metadata[b"huggingface"])
        return list(info["info"]["features"][label_column]["names"])
    except (KeyError, TypeError, ValueError):
        return []


def _parquet_records(rows: ParquetRows) -> Iterator[tuple[Item, bytes | None]]:
    pq = _pyarrow()
    for path, group, first, n, in_file in rows.groups:
        lo, hi = max(rows.start, first) - first, min(rows.stop, first + n) - first
        pf = pq.ParquetFile(path)
        columns = [c for c in (rows.image_column, rows.label_column) if c in pf.schema_arrow.names]
        table = pf.read_row_group(group, columns=columns).slice(lo, hi - lo).to_pylist()
        stem = sanitize_key(Path(path).stem)
        for i, row in enumerate(table, start=in_file + lo):
            image = row[rows.image_column]
            data, name = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
            label = row.get(rows.label_column)
            key = sanitize_key(os.path.splitext(name)[0]) if name else f"{stem}_{i:07d}"
            source = f"{path}#row{i}" + (f" ({name})" if name else "")
            yield Item(key, -1 if label is None else int(label), source), data


# ------------------------------------------------------------------------------------------------
# Checking one image.


def inspect_image(data: bytes) -> dict:
    """{"format", "width", "height", "mode"} of valid image bytes; ImageDecodeError (with a reason) if not."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    info: dict = {}
    try:
        with Image.open(io.BytesIO(data)) as img:
            info = {"format": img.format, "width": img.width, "height": img.height, "mode": img.mode}
            img.verify()  # structure and checksums (PNG CRCs); the full decode below catches truncation
    except UnidentifiedImageError:
        decode_image(data)  # raises ImageDecodeError saying why: no image at all, or a damaged header
        raise ImageDecodeError("not an image") from None
    except Exception as e:  # noqa: BLE001 (PIL raises many exception types on bad data)
        raise ImageDecodeError(f"corrupt or truncated {info.get('format') or 'image'}: {e}") from None
    decode_image(data)
    return info


# ------------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process).


@dataclass(frozen=True)
class Job:
    index: int
    name: str
    out: str
    inputs: tuple[Item, ...] | ParquetRows
    old_fingerprint: str | None


def _fingerprint(job: Job) -> str:
    h = hashlib.sha1(FORMAT.encode())
    if isinstance(job.inputs, ParquetRows):
        for path, group, *_ in job.inputs.groups:
            st = os.stat(path)
            h.update(f"{path}|{group}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        rows = job.inputs
        h.update(f"{rows.start}|{rows.stop}|{rows.image_column}|{rows.label_column}".encode())
        return h.hexdigest()
    for item in job.inputs:
        if item.data is not None:
            stamp = hashlib.sha1(item.data).hexdigest()
        else:
            try:
                st = os.stat(item.source)
                stamp = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError as e:
                stamp = f"unreadable {e}"
        meta = json.dumps(item.meta, sort_keys=True)
        h.update(f"{item.key}|{item.label}|{item.source}|{stamp}|{meta}\n".encode())
    return h.hexdigest()


def _records(job: Job) -> Iterator[tuple[Item, bytes | None]]:
    if isinstance(job.inputs, ParquetRows):
        yield from _parquet_records(job.inputs)
        return
    for item in job.inputs:
        if item.data is not None:
            yield item, item.data
            continue
        try:
            yield item, Path(item.source).read_bytes()
        except OSError as e:
            yield item, e


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: Job) -> dict:
    """Write (or keep, when its fingerprint matches) one shard; return its count and skipped inputs."""
    fingerprint = _fingerprint(job)
    final = Path(job.out, job.name)
    if final.exists() and job.old_fingerprint == fingerprint:
        return {"name": job.name, "fingerprint": fingerprint, "resumed": True, "inputs": len(job.inputs)}
    tmp = final.with_name(f".{job.name}.tmp{os.getpid()}")
    count, skipped = 0, []
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for item, data in _records(job):
                try:
                    if isinstance(data, OSError):
                        raise ImageDecodeError(f"cannot read: {data}")
                    if data is None:
                        raise ImageDecodeError("no image bytes")
                    info = inspect_image(data)
                except ImageDecodeError as e:
                    skipped.append({"path": item.source, "reason": str(e), "shard": job.name})
                    continue
                meta = {"source": item.source, **info, **item.meta}
                ext = EXTENSIONS.get(info["format"], str(info["format"]).lower())
                _add(tar, f"{item.key}.{ext}", data)
                _add(tar, f"{item.key}.cls", str(item.label).encode())
                _add(tar, f"{item.key}.json", json.dumps(meta, sort_keys=True).encode())
                count += 1
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "name": job.name,
        "fingerprint": fingerprint,
        "resumed": False,
        "count": count,
        "skipped": skipped,
        "inputs": len(job.inputs),
    }


# ------------------------------------------------------------------------------------------------
# Writing all shards: parallel, resumable, with a manifest.


def read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        return manifest if manifest.get("format") == FORMAT else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = Path(out, f".manifest.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(out, "manifest.json"))


def write_shards(
    inputs: Sequence[Item] | ParquetRows,
    out: str | Path,
    prefix: str = "shard",
    shard_size: int = 1000,
    classes: Sequence[str] = (),
    source: str = "",
    workers: int = 1,
    progress: bool = True,
    report=None,
) -> dict:
    """Write `inputs` as shards `OUT/{prefix}-{i:06d}.tar` plus `OUT/manifest.json`; return the manifest.

    Args:
        inputs: Items (folders, photos) or parquet rows.
        out: output folder (created).
        prefix: shard name prefix.
        shard_size: inputs per shard (a shard holds fewer when some inputs are bad).
        classes: class names (index = label).
        source: description stored in the manifest.
        workers: processes writing shards in parallel (1: in this process).
        progress: show a tqdm progress bar.
        report: called as report(path, reason) for each bad input; default prints to stderr.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if len(inputs) == 0:
        raise ValueError(f"no input files for {out} (source: {source or 'empty list'})")
    if not re.fullmatch(r"[\w-]+", prefix):
        raise ValueError(f"shard prefix must be letters, digits, '_' or '-', got {prefix!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{prefix}-*.tar.tmp*"):
        stale.unlink(missing_ok=True)
    n = len(inputs)
    num_shards = max(1, math.ceil(n / shard_size))
    names = [f"{prefix}-{i:06d}.tar" for i in range(num_shards)]
    old = read_manifest(out)
    old_fp = old.get("fingerprints", {}) if old.get("shard_size") == shard_size else {}

    def piece(i: int):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        return inputs.slice(lo, hi) if isinstance(inputs, ParquetRows) else tuple(inputs[lo:hi])

    jobs = [Job(i, name, str(out), piece(i), old_fp.get(name)) for i, name in enumerate(names)]
    manifest = {
        "format": FORMAT,
        "source": source,
        "kind": "parquet" if isinstance(inputs, ParquetRows) else "files",
        "prefix": prefix,
        "shard_size": shard_size,
        "pattern": f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar",
        "complete": False,
        "classes": list(classes),
        "total": 0,
        "inputs": n,
        "skipped_total": 0,
        "shards": {},
        "fingerprints": {},
        "skipped": [],
    }
    report = report or (lambda path, reason: tqdm.write(f"skipped {path}: {reason}", file=sys.stderr))
    bar = tqdm(total=n, unit="img", desc=f"shards -> {out}", disable=not progress, dynamic_ncols=True)
    results: dict[str, dict] = {}

    def collect(result: dict) -> None:
        name = result["name"]
        if result["resumed"]:
            result["count"] = old["shards"][name]
            result["skipped"] = [s for s in old.get("skipped", []) if s.get("shard") == name]
        else:
            for s in result["skipped"]:
                report(s["path"], s["reason"])
        results[name] = result
        manifest["shards"] = {k: results[k]["count"] for k in names if k in results}
        manifest["fingerprints"] = {k: results[k]["fingerprint"] for k in names if k in results}
        manifest["skipped"] = [s for k in names if k in results for s in results[k]["skipped"]]
        manifest["total"] = sum(manifest["shards"].values())
        manifest["skipped_total"] = len(manifest["skipped"])
        _write_manifest(out, manifest)
        bar.update(result["inputs"])
        bar.set_postfix(skipped=manifest["skipped_total"], refresh=False)

    try:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                collect(write_shard(job))
        else:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(write_shard, jobs):
                    collect(result)
    finally:
        bar.close()
    manifest["complete"] = True
    _write_manifest(out, manifest)
    extra = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in names)
    if extra:
        print(
            f"warning: {out} also holds {len(extra)} shard(s) not in this data set: {extra[:3]}",
            file=sys.stderr,
        )
    return manifest


# ------------------------------------------------------------------------------------------------
# Command line.


def _read_classes(path: str) -> list[str]:
    """Class names from a manifest.json (its "classes") or a text file with one name per line."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        classes = json.loads(text).get("classes")
        if not classes:
            raise ValueError(f"{path} lists no classes")
        return list(classes)
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcssdae shards",
        description="Convert an image folder (ImageNet layout train/<wnid>/*.JPEG, or any tree of images) or "
        "Hugging Face imagenet-1k parquet files into checked WebDataset tar shards with a manifest.json. "
        "Rerunning resumes: complete shards whose inputs did not change are kept.",
    )
    parser.add_argument(
        "src", nargs="+", help="image folder, or parquet file(s) / folder(s) holding parquet files"
    )
    parser.add_argument("out", help="output folder for the shards and manifest.json")
    parser.add_argument("--prefix", help="shard name prefix (default: the name of OUT)")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard (default 1000, ~110 MB on ImageNet)"
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--format", choices=("auto", "folder", "parquet"), default="auto", help="source kind")
    parser.add_argument(
        "--split", help="parquet: only files whose name starts with this (train, validation, test)"
    )
    parser.add_argument(
        "--classes",
        help="class order: a manifest.json (e.g. of the train shards) or a text file, one name per line",
    )
    parser.add_argument(
        "--no-labels", action="store_true", help="folders: do not take classes from top-level folders"
    )
    parser.add_argument(
        "--image-column", default="image", help="parquet image column (struct with bytes, path)"
    )
    parser.add_argument("--label-column", default="label", help="parquet label column")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        return convert(args, parser)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:  # bad input: one line, no traceback
        print(f"dcssdae shards: error: {error}", file=sys.stderr)
        return 2


def check_sources(sources: list[Path]) -> None:
    """Each source exists and holds files: raises FileNotFoundError / ValueError naming it and what it takes."""
    takes = ("an image folder (ImageNet layout train/<wnid>/*.JPEG, or any tree of images) or Hugging Face "
             "parquet files")
    for src in sources:
        if not src.exists():
            raise FileNotFoundError(f"source {src} does not exist: give {takes}")
        if src.is_dir() and next((f for f in src.rglob("*") if f.is_file() and not f.name.startswith(".")),
                                 None) is None:
            raise ValueError(f"source folder {src} is empty (no files under it): give {takes}")


def convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`dcssdae shards` once its arguments are parsed."""
    sources = [Path(s) for s in args.src]
    check_sources(sources)
    kind = args.format
    if kind == "auto":
        single_dir = len(sources) == 1 and sources[0].is_dir()
        kind = "parquet" if not single_dir or next(sources[0].rglob("*.parquet"), None) else "folder"
    classes = _read_classes(args.classes) if args.classes else None
    if kind == "folder":
        if len(sources) != 1:
            parser.error("a folder source is a single SRC")
        inputs, classes = list_folder(sources[0], classes, labels=not args.no_labels)
    else:
        inputs, found = list_parquet(sources, args.split, args.image_column, args.label_column)
        classes = classes or found
    out = Path(args.out)
    manifest = write_shards(
        inputs,
        out,
        args.prefix or sanitize_key(out.resolve().name),
        args.shard_size,
        classes,
        source=" ".join(map(str, sources)),
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(
        f"{manifest['total']} images in {len(manifest['shards'])} shards "
        f"({manifest['skipped_total']} skipped, {len(classes or [])} classes): {out / manifest['pattern']}"
    )
    return 0
