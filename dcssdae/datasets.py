"""Streaming image datasets over WebDataset shards: the batch, reading shards, the exact split of validation shards
over ranks and workers, and the two datasets (`TrainShards`, `ValShards`) that `data.ImageNetDataModule` loads.

Shards are written by `dcssdae shards` (see `dcssdae/shards.py` for the sample format and the `manifest.json` beside
them). Every sample holds the original image bytes under their real extension (`jpg`, `png`, `webp`, ...), `cls`
(class index as text, -1 if unknown) and optional `json` metadata.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcssdae.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, train_transform, val_transform

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours are exact
# (training: a fixed number of batches split over the workers; validation: counted from the manifest).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

# ------------------------------------------------------------------------------------------------
# Errors and the batch.


class TrainingDataError(RuntimeError):
    """The training stream cannot go on: no shard readable, or no sample decodable, many times in a row."""


def collate(images: list[Image.Image], labels: list[int], keys: list[str]) -> dict:
    """Stack RGB images into the project's batch dict (float in [-1, 1], channels first)."""
    x = np.stack([np.asarray(img, dtype=np.uint8) for img in images]).transpose(0, 3, 1, 2)  # (B, 3, S, S)
    x = np.ascontiguousarray(x)  # reorder while still uint8 (4x less to move than float)
    x = torch.from_numpy(x).float().div_(127.5).sub_(1.0)  # [-1, 1]; 0 -> -1 and 255 -> 1 exactly
    return {"image": x, "label": torch.tensor(labels, dtype=torch.long), "key": list(keys)}


# ------------------------------------------------------------------------------------------------
# Reading shards.


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns ("train-{000000..001281}.tar"), "::"-joined lists or a list of patterns -> URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for u in wds.shardlists.expand_urls(str(p))]
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    return None if ("://" in url or url.startswith("pipe:")) else Path(url)


def shard_counts(urls: list[str]) -> list[int] | None:
    """Samples per shard from the `manifest.json` beside local shards; None if any count is unknown."""
    manifests: dict[Path, dict] = {}
    counts = []
    for url in urls:
        path = _local_path(url)
        if path is None:
            return None
        if path.parent not in manifests:
            try:
                manifests[path.parent] = json.loads((path.parent / "manifest.json").read_text())
            except (OSError, ValueError):
                manifests[path.parent] = {}
        count = manifests[path.parent].get("shards", {}).get(path.name)
        if count is None:
            return None
        counts.append(int(count))
    return counts


def manifest_classes(urls: list[str]) -> list[str] | None:
    """Class names recorded in the manifest beside the first local shard, if any."""
    path = _local_path(urls[0])
    try:
        return json.loads((path.parent / "manifest.json").read_text()).get("classes") or None
    except (AttributeError, OSError, ValueError):
        return None


def read_shard(url: str, handler=wds.handlers.reraise_exception) -> Iterator[dict]:
    """Samples (dicts of raw bytes keyed by extension, plus `__key__`) of one tar shard, in file order."""
    return wds.tariterators.tarfile_samples([{"url": url}], handler=handler)


def _sample_to_image(sample: dict) -> tuple[Image.Image, int]:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise ImageDecodeError(f"no image in sample (entries: {found})")
    label = int(sample["cls"]) if "cls" in sample else -1
    return decode_image(sample[ext]), label


# ------------------------------------------------------------------------------------------------
# Exact split of validation data over ranks x workers (each image read once, no padding, no duplicate).


def split_assignment(num_shards: int, part: int, num_parts: int) -> list[tuple[int, int, int]]:
    """What reader `part` of `num_parts` (= rank * workers + worker) reads: a list of (shard, m, r).

    The reader keeps sample i of `shard` iff i % m == r. With at least as many shards as readers,
    reader p takes whole shards p, p + num_parts, ... (m = 1). With fewer shards, the readers
    p = j, j + num_shards, ... share shard j, each keeping every m-th sample, so that every shard is
    read by ceil(num_parts / num_shards) readers at most and the split stays exact.
    """
    if num_shards >= num_parts:
        return [(j, 1, 0) for j in range(part, num_shards, num_parts)]
    shard = part % num_shards
    return [(shard, len(range(shard, num_parts, num_shards)), part // num_shards)]


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int, int]:
    """(worker id, number of workers, worker seed) of the DataLoader worker running this code."""
    info = get_worker_info()
    return (0, 1, 0) if info is None else (info.id, info.num_workers, info.seed)


# ------------------------------------------------------------------------------------------------
# The datasets. Both batch inside the workers (DataLoader(batch_size=None)) and put, in every batch,
# "skipped": the number of samples this worker skipped (decode errors) since its previous batch.


class ValShards(IterableDataset):
    """Every validation image exactly once across ranks and workers, resized and centre-cropped.

    Args:
        urls: shard URLs (brace patterns allowed).
        image_size: output side S.
        batch_size: images per batch (the last batch of each worker may be smaller).
        rank, world_size: this process's place among the ranks; None = from torch.distributed (or 0, 1).
        num_workers: DataLoader workers that will read it (used only by `__len__`).
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ):
        self.urls = expand_urls(urls)
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.num_workers = max(1, num_workers)  # for __len__ only; iteration uses the real worker info
        self.counts = shard_counts(self.urls)

    def __len__(self) -> int:
        """Batches this rank yields (from the manifest); TypeError when the shard sizes are unknown."""
        if self.counts is None:
            raise TypeError("validation length unknown: no manifest.json with counts beside the shards")
        batches = 0
        for worker in range(self.num_workers):
            part = self.rank * self.num_workers + worker
            plan = split_assignment(len(self.urls), part, self.world_size * self.num_workers)
            samples = sum(len(range(r, self.counts[j], m)) for j, m, r in plan)
            batches += math.ceil(samples / self.batch_size)
        return batches

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, _ = _worker()
        part = self.rank * num_workers + worker
        plan = split_assignment(len(self.urls), part, self.world_size * num_workers)
        images, labels, keys, skipped = [], [], [], 0

        def on_error(exn: Exception) -> bool:
            nonlocal skipped
            skipped += 1
            log.warning("validation: skipped unreadable shard data: %s: %s", type(exn).__name__, exn)
            return True

        for shard, m, r in plan:
            for i, sample in enumerate(read_shard(self.urls[shard], handler=on_error)):
                if i % m != r:
                    continue
                try:
                    img, label = _sample_to_image(sample)
                except (ImageDecodeError, ValueError) as e:
                    skipped += 1
                    log.warning(
                        "validation: skipped sample %s of %s: %s", sample["__key__"], self.urls[shard], e
                    )
                    continue
                images.append(val_transform(img, self.image_size))
                labels.append(label)
                keys.append(sample["__key__"])
                if len(images) == self.batch_size:
                    yield {**collate(images, labels, keys), "skipped": skipped}
                    images, labels, keys, skipped = [], [], [], 0
        if images:
            yield {**collate(images, labels, keys), "skipped": skipped}


def _shuffled(samples: Iterator[dict], buffer: int, rng: random.Random, initial: int = 100) -> Iterator[dict]:
    """Shuffle a stream through a buffer of up to `buffer` samples.

    Output starts once `initial` samples are held; until the buffer is full it takes in two samples
    per sample given out, so it fills without a long pause at start-up.
    """
    pool: list[dict] = []
    initial = min(initial, buffer)
    for sample in samples:
        pool.append(sample)
        if len(pool) < buffer:
            pool.extend(itertools.islice(samples, 1))
        if len(pool) < initial:
            continue
        i = rng.randrange(len(pool))
        pool[i], pool[-1] = pool[-1], pool[i]
        yield pool.pop()
    rng.shuffle(pool)
    yield from pool


class TrainShards(IterableDataset):
    """Endless random training batches: shards drawn with replacement, shuffle buffer, random crops.

    An "epoch" is a fixed number of batches, `batches_per_rank`, split evenly over the workers. Batch i of
    epoch e on a rank is batch i // W of random stream i % W (W = DataLoader workers, which yield their
    batches round robin), and stream s of epoch e is seeded by (`seed`, rank, e, s) alone. So the batches are
    a pure function of their position, which makes training resumable mid-epoch: `set_position(e, k)` starts
    the next iteration at batch k of epoch e (worker w plays stream (w + k) % W, re-reading and dropping the
    batches of it that were already used: resuming costs at most one epoch of data loading, no training).
    The position lives in shared memory, so the main process can set it for persistent workers.

    Unreadable shard data and undecodable samples are skipped and logged; the stream stops with a
    `TrainingDataError` when no shard can be read (or holds samples) many times in a row, or when no sample
    decodes many times in a row, instead of looping forever.

    Args:
        urls: shard URLs (brace patterns allowed).
        image_size: crop side S.
        aug_scale: short side drawn uniformly in [S, S * aug_scale] before the crop (1 = no zoom).
        batch_size: images per batch (always full).
        aug_color: colour augmentation strength (`train_transform`; 0 = none).
        aug_permute: probability of a random order of the RGB channels (`train_transform`; 0 = never).
        batches_per_rank: batches per epoch on this rank (a multiple of the number of workers).
        shuffle_buffer: samples (still encoded) held per worker for shuffling.
        seed: base seed.
        rank: this process's rank; None = from torch.distributed (or 0).
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int,
        aug_scale: float,
        batch_size: int,
        batches_per_rank: int,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        aug_color: float = 0.0,
        aug_permute: float = 0.0,
    ):
        self.urls = expand_urls(urls)
        self.aug_color, self.aug_permute = aug_color, aug_permute
        self.image_size, self.aug_scale, self.batch_size = image_size, aug_scale, batch_size
        self.batches_per_rank, self.shuffle_buffer, self.seed = batches_per_rank, shuffle_buffer, seed
        self.rank = _dist_rank_world(None, None)[0] if rank is None else rank
        # (epoch, first batch, 1 once set_position was called) for the next __iter__, shared with the workers.
        self.position = torch.zeros(3, dtype=torch.long).share_memory_()
        self.iterations = 0  # __iter__ calls on this copy: the epoch, when no position was ever set
        self.max_consecutive_skips = max(1000, 2 * shuffle_buffer)  # undecodable samples in a row -> give up

    def __len__(self) -> int:
        return self.batches_per_rank

    def set_position(self, epoch: int, first_batch: int = 0) -> None:
        """Start the next iteration at batch `first_batch` of `epoch` (0 <= first_batch <= batches_per_rank)."""
        if not 0 <= first_batch <= self.batches_per_rank:
            raise ValueError(f"first_batch must be in [0, {self.batches_per_rank}], got {first_batch}")
        self.position[0], self.position[1], self.position[2] = epoch, first_batch, 1

    def _shard_urls(self, rng: random.Random) -> Iterator[dict]:
        """Samples of shards drawn with replacement; gives up when no shard could be read (or held a sample)
        many times in a row."""
        failures, limit = 0, max(20, 2 * len(self.urls))

        def give_up_after(error: str) -> None:
            nonlocal failures
            failures += 1
            log.warning("training: skipped unreadable shard data: %s", error)
            if failures > limit:
                raise TrainingDataError(f"no readable training shards among {self.urls[:3]}... ({failures} "
                                        f"failures in a row): last error {error}")

        def on_error(exn: Exception) -> bool:
            give_up_after(f"{type(exn).__name__}: {exn}")
            return True

        while True:
            url, samples = rng.choice(self.urls), 0
            for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=on_error):
                failures, samples = 0, samples + 1
                yield sample
            if samples == 0:
                give_up_after(f"{url} holds no samples")

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, _ = _worker()
        epoch, first, explicit = self.position.tolist()
        if not explicit:  # iterated without set_position (outside ImageNetDataModule): each iteration an epoch
            epoch = self.iterations
        self.iterations += 1
        stream = (worker + first) % num_workers
        used = len(range(stream, first, num_workers))  # batches of this stream before batch `first`
        per_stream = math.ceil(self.batches_per_rank / num_workers)
        return itertools.islice(self._batches(epoch, stream, num_workers), used, per_stream)

    def _batches(self, epoch: int, stream: int, num_streams: int) -> Iterator[dict]:
        entropy = [self.seed, self.rank, epoch, stream]
        rng = random.Random(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        images, labels, keys, skipped, in_a_row, index = [], [], [], 0, 0, stream
        for sample in _shuffled(self._shard_urls(rng), self.shuffle_buffer, rng):
            try:
                img, label = _sample_to_image(sample)
            except (ImageDecodeError, ValueError) as e:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                key, url = sample.get("__key__"), sample.get("__url__")
                log.warning("training: skipped sample %s of %s: %s", key, url, e)
                if in_a_row >= self.max_consecutive_skips:
                    raise TrainingDataError(f"training: the last {in_a_row} samples all failed to decode (last: "
                                            f"{key} of {url}: {e}); are these image shards?") from None
                continue
            in_a_row = 0
            images.append(train_transform(img, self.image_size, self.aug_scale, rng, self.aug_color,
                                          self.aug_permute))
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {**collate(images, labels, keys), "skipped": skipped, "epoch": epoch, "index": index}
                images, labels, keys, skipped, index = [], [], [], 0, index + num_streams


# ------------------------------------------------------------------------------------------------
# Resuming mid-epoch: the data module's position and skip counts, and the loader that hands the position to its
# TrainShards (shared by the image and the latent data modules).


class TrainingPosition:
    """Mixin for a LightningDataModule over `TrainShards`: keeps its loader settings (`_init_loading`, called by the
    module's __init__), counts skipped samples and keeps the training position (epoch, next batch) in its
    state_dict, so that a resumed run continues mid-epoch (`_train_start`)."""

    def _init_loading(self, batch_size: int, val_batch_size: int | None, num_workers: int, shuffle_buffer: int,
                      train_epoch_size: int | None, seed: int, pin_memory: bool | None) -> None:
        """Check and keep the loader settings (see the data modules' arguments); start counting and positioning."""
        if batch_size <= 0 or (val_batch_size is not None and val_batch_size <= 0):
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {val_batch_size}")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.train_epoch_size, self.seed = train_epoch_size, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.skipped_samples = {"train": 0, "val": 0}
        self.classes: list[str] | None = None
        self.train_position = (0, 0)  # (epoch, batch) just after the last training batch handed to the model
        self.resume_position: tuple[int, int] | None = None  # train_position read from a checkpoint

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size): the trainer's, else torch.distributed's (or (0, 1))."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else _dist_rank_world(None, None)

    def _train_start(self) -> tuple[int, int] | None:
        """(epoch, first batch) for the next training iteration: the trainer's epoch, and when resuming into the
        checkpoint's epoch, the batches of it already trained on. None outside `fit` (each iteration is then the
        next epoch)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        epoch = trainer.current_epoch
        resume = self.resume_position
        return epoch, resume[1] if resume is not None and resume[0] == epoch else 0

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Move the per-batch skip count into `skipped_samples` and note the training position, leaving the sample
        fields. (Called as each batch reaches the model, after any prefetching.)"""
        skipped, epoch, index = batch.pop("skipped", 0), batch.pop("epoch", None), batch.pop("index", None)
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if skipped:
            self.skipped_samples["train" if training else "val"] += int(skipped)
        if training and epoch is not None:
            self.train_position = (int(epoch), int(index) + 1)
        return batch

    def state_dict(self) -> dict:
        return {"train_position": list(self.train_position), "skipped_samples": dict(self.skipped_samples)}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_position" in state_dict:
            self.train_position = self.resume_position = tuple(int(v) for v in state_dict["train_position"])
        self.skipped_samples.update(state_dict.get("skipped_samples", {}))


class PositionedLoader(DataLoader):
    """The training DataLoader: before each iteration it tells its `TrainShards` where to start (through
    shared memory, so persistent workers see it too): `start()` -> (epoch, first batch), or None."""

    def __init__(self, dataset: TrainShards, start, batch_size: None = None, **kwargs):
        super().__init__(dataset, batch_size=batch_size, **kwargs)  # TrainShards batches in its workers
        self.start = start

    def __iter__(self):
        position = self.start()
        if position is not None:
            self.dataset.set_position(*position)
        return super().__iter__()

    # Lightning's "stateful loader" protocol, so that it knows this loader resumes mid-epoch (and does not warn
    # otherwise). The position itself is saved and restored by the data module's state_dict / load_state_dict.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
