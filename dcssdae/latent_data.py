"""`LatentDataModule`: the latent shards written by `dcssdae latents`, as training data for a latent diffusion model.

    dm = LatentDataModule("latents/train", batch_size=256)        # a folder of latent shards, or a brace pattern
    dm.setup("fit")
    for batch in dm.train_dataloader():                         # {"latent": (B, C, h, w), "label": (B,), "key"}
        ...
    x = vae.decode(dm.scaling.unscale(z)).sample                 # a sample of the diffusion model -> raw latent

Each latent is z = mean + std * noise, a draw from the encoder's posterior (Kingma & Welling 2014, Eq. 10; or the
mean itself with `sample_posterior=False`), of the image or, half the time when the shards hold one (--flip), of its
mirror image, then scaled as the diffusion model should see it (`LatentScaling`, from the shards' stats.json).

The streams are those of the image data module (`dcssdae.datasets`): training draws shards with replacement through
a shuffle buffer, every rank and worker on its own seeded stream, an epoch a fixed number of batches per rank, and
the batches a pure function of (seed, rank, epoch, worker), so a resumed run continues where it stopped; validation
reads every latent exactly once over all ranks and workers (the posterior mean, not flipped).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from dcssdae.datasets import (
    PositionedLoader,
    TrainingDataError,
    TrainingPosition,
    TrainShards,
    ValShards,
    _local_path,
    _shuffled,
    _worker,
    expand_urls,
    manifest_classes,
    read_shard,
    shard_counts,
    split_assignment,
)

log = logging.getLogger(__name__)

NORMALIZATIONS = ("global", "channel", "none")


# ------------------------------------------------------------------------------------------------
# Scaling (Rombach et al. 2022, Sec. 4.3.2): what the diffusion model sees, and back.


@dataclass
class LatentScaling:
    """z_scaled = (z - shift) * scale per channel, and back: "global" uses stats.json's shift_factor /
    scaling_factor (the convention of `dcssdae latent-stats` and of diffusers pipelines), "channel" its
    channel_mean / 1 / channel_std (zero-mean, unit-variance channels), "none" leaves z as it is."""

    mode: str = "global"
    shift: list[float] = field(default_factory=lambda: [0.0])  # one value (global) or one per channel
    scale: list[float] = field(default_factory=lambda: [1.0])

    @classmethod
    def from_stats(cls, stats: dict, mode: str = "global", scaling_factor: float | None = None,
                   shift_factor: float | None = None) -> LatentScaling:
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
        if mode == "channel":
            return cls(mode, list(stats["channel_mean"]), [1.0 / s for s in stats["channel_std"]])
        if mode == "none":
            return cls(mode)
        scale = stats["scaling_factor"] if scaling_factor is None else scaling_factor
        return cls(mode, [stats["shift_factor"] if shift_factor is None else shift_factor], [scale])

    def _view(self, values: list[float], z):
        a = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
        return torch.as_tensor(a, device=z.device, dtype=z.dtype) if isinstance(z, torch.Tensor) else a

    def scale_latent(self, z):
        """Raw latent (..., C, h, w), a tensor or an array -> what the diffusion model sees."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def unscale(self, z):
        """A diffusion model's latent -> the raw latent the autoencoder decodes (`AutoencoderDCSSD.decode`)."""
        return z / self._view(self.scale, z) + self._view(self.shift, z)


# ------------------------------------------------------------------------------------------------
# One sample of a latent shard -> (latent, label).


def _array(sample: dict, name: str) -> np.ndarray:
    if name not in sample:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no {name} in sample (entries: {found}); are these latent shards from `dcssdae latents`?")
    return np.load(io.BytesIO(sample[name]), allow_pickle=False).astype(np.float32)


def read_latent(sample: dict, flip: bool, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """The raw latent of a sample: its mean, or mean + std * noise with noise drawn from `rng`; the mirror image's
    with `flip` (when stored)."""
    suffix = "_flip" if flip and "mean_flip.npy" in sample else ""
    z = _array(sample, f"mean{suffix}.npy")
    if rng is not None:
        z = z + _array(sample, f"std{suffix}.npy") * rng.standard_normal(z.shape, dtype=np.float32)
    return z, int(sample["cls"]) if "cls" in sample else -1


def latent_batch(latents: list[np.ndarray], labels: list[int], keys: list[str], scaling: LatentScaling) -> dict:
    z = torch.from_numpy(np.stack(latents))
    return {"latent": scaling.scale_latent(z), "label": torch.tensor(labels, dtype=torch.long), "key": list(keys)}


# ------------------------------------------------------------------------------------------------
# The datasets: the image datasets' streams and splits, reading latents.


class LatentTrainShards(TrainShards):
    """`TrainShards` (endless, resumable, per-rank and per-worker streams) over latent shards: each latent a
    posterior draw (noise from the stream's seed), of the mirror image with probability 1/2 when stored."""

    def __init__(self, urls, batch_size: int, batches_per_rank: int, scaling: LatentScaling,
                 sample_posterior: bool = True, flip: bool = True, shuffle_buffer: int = 10000, seed: int = 0,
                 rank: int | None = None):
        super().__init__(urls, image_size=0, aug_scale=1.0, batch_size=batch_size, batches_per_rank=batches_per_rank,
                         shuffle_buffer=shuffle_buffer, seed=seed, rank=rank)
        self.scaling, self.sample_posterior, self.flip = scaling, sample_posterior, flip

    def _batches(self, epoch: int, stream: int, num_streams: int):
        entropy = [self.seed, self.rank, epoch, stream]
        rng = random.Random(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        noise_rng = np.random.default_rng(np.random.SeedSequence([*entropy, 1]))
        latents, labels, keys, skipped, in_a_row, index = [], [], [], 0, 0, stream
        for sample in _shuffled(self._shard_urls(rng), self.shuffle_buffer, rng):
            flip = self.flip and rng.random() < 0.5
            try:
                z, label = read_latent(sample, flip, noise_rng if self.sample_posterior else None)
            except ValueError as e:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                log.warning("training: skipped sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                if in_a_row >= self.max_consecutive_skips:
                    raise TrainingDataError(f"training: the last {in_a_row} samples all failed to read ({e})") from None
                continue
            in_a_row = 0
            latents.append(z)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(latents) == self.batch_size:
                yield {**latent_batch(latents, labels, keys, self.scaling), "skipped": skipped, "epoch": epoch,
                       "index": index}
                latents, labels, keys, skipped, index = [], [], [], 0, index + num_streams


class LatentValShards(ValShards):
    """`ValShards` (every sample once over ranks and workers) over latent shards: posterior means, not flipped."""

    def __init__(self, urls, batch_size: int, scaling: LatentScaling, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 0):
        super().__init__(urls, 0, batch_size, rank, world_size, num_workers)
        self.scaling = scaling

    def __iter__(self):
        worker, num_workers, _ = _worker()
        part = self.rank * num_workers + worker
        latents, labels, keys, skipped = [], [], [], 0
        for shard, m, r in split_assignment(len(self.urls), part, self.world_size * num_workers):
            for i, sample in enumerate(read_shard(self.urls[shard])):
                if i % m != r:
                    continue
                try:
                    z, label = read_latent(sample, flip=False, rng=None)
                except ValueError as e:
                    skipped += 1
                    log.warning("validation: skipped sample %s of %s: %s", sample["__key__"], self.urls[shard], e)
                    continue
                latents.append(z)
                labels.append(label)
                keys.append(sample["__key__"])
                if len(latents) == self.batch_size:
                    yield {**latent_batch(latents, labels, keys, self.scaling), "skipped": skipped}
                    latents, labels, keys, skipped = [], [], [], 0
        if latents:
            yield {**latent_batch(latents, labels, keys, self.scaling), "skipped": skipped}


# ------------------------------------------------------------------------------------------------
# The DataModule.


def latent_urls(shards: str | list[str]) -> list[str]:
    """Shard URLs of a folder written by `dcssdae latents` (its manifest's shards), a brace pattern or a list."""
    if isinstance(shards, (str, Path)) and Path(shards).is_dir():
        manifest_path = Path(shards) / "manifest.json"
        try:
            names = json.loads(manifest_path.read_text())["shards"]
        except (OSError, ValueError, KeyError):
            raise FileNotFoundError(f"{shards}: no manifest.json of `dcssdae latents` (an unfinished run? rerun "
                                    "it; or give the shards as a brace pattern)") from None
        return [str(Path(shards) / name) for name in names]
    urls = expand_urls(shards)
    missing = [p for p in map(_local_path, urls) if p is not None and not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} latent shards do not exist, e.g. {missing[0]} (write "
                                "them with `dcssdae latents`)")
    return urls


def read_stats(urls: list[str], stats: str | None) -> dict:
    """stats.json: the given path, else the one beside the first shard."""
    path = Path(stats) if stats else (_local_path(urls[0]) or Path("?")).parent / "stats.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot read the latent statistics {path} ({error}); `dcssdae latents` writes "
                                "stats.json beside the shards, or pass stats=PATH") from None


class LatentDataModule(TrainingPosition, L.LightningDataModule):
    """Latent shards of `dcssdae latents` as `{"latent": (B, C, h, w) float32, "label": (B,) long, "key": list}`
    batches, for training a latent diffusion model (DDP: every rank its own training stream, validation split
    exactly over ranks; see the module docstring). `scaling` maps the model's latents back to raw ones."""

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        stats: str | None = None,
        normalize: str = "global",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = True,
        flip: bool = True,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 10000,
        train_epoch_size: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        """
        Args:
            train_shards: a folder written by `dcssdae latents`, a brace pattern of its shards, or a list.
            val_shards: the same for validation (None: no validation data).
            stats: stats.json to scale with; None: the one beside the first training shard.
            normalize: "global" ((z - shift_factor) * scaling_factor), "channel" (per-channel mean and std) or
                "none" (raw latents).
            scaling_factor, shift_factor: replace stats.json's for "global" (e.g. the autoencoder's own).
            sample_posterior: training latents are z = mean + std * noise; False: the mean.
            flip: use the mirror image's latents (when stored: `dcssdae latents --flip`) half the time.
            batch_size: training latents per batch on each rank.
            val_batch_size: validation latents per batch on each rank (default: `batch_size`).
            num_workers: DataLoader workers per rank.
            shuffle_buffer: samples held per training worker for shuffling (a 32 x 32 x 4 float16 latent with its
                std is ~16 kB: 10000 cost ~160 MB per worker); capped at the data set's size when known.
            train_epoch_size: training samples per epoch over all ranks; None: the number of latents in the
                shards' manifest.
            seed: base seed of the training streams and posterior noise (mixed with rank, worker and epoch).
            pin_memory: pin batches in page-locked memory; None = when CUDA is available.
        """
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self._init_loading(batch_size, val_batch_size, num_workers, shuffle_buffer, train_epoch_size, seed, pin_memory)
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.stats_path = train_shards, val_shards, stats
        self.normalize, self.scaling_factor, self.shift_factor = normalize, scaling_factor, shift_factor
        self.sample_posterior, self.flip = sample_posterior, flip

    def setup(self, stage: str | None = None) -> None:
        self.train_urls = latent_urls(self.train_shards)
        self.val_urls = latent_urls(self.val_shards) if self.val_shards is not None else []
        self.stats = read_stats(self.train_urls, self.stats_path)
        self.classes = manifest_classes(self.train_urls)  # class names of the source images, if recorded
        self.scaling = LatentScaling.from_stats(self.stats, self.normalize, self.scaling_factor, self.shift_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents (from stats.json)."""
        return tuple(self.stats["latent_shape"])

    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "train_urls"):
            self.setup("fit")
        rank, world_size = self._rank_world()
        counts = shard_counts(self.train_urls)
        epoch_size = self.train_epoch_size or (sum(counts) if counts else None)
        if epoch_size is None:
            raise ValueError("train_epoch_size is needed: the latent shards have no manifest.json with counts")
        buffer = self.shuffle_buffer if counts is None else max(1, min(self.shuffle_buffer, sum(counts)))
        workers = max(1, self.num_workers)
        batches = math.ceil(math.ceil(epoch_size / (world_size * self.batch_size)) / workers) * workers
        dataset = LatentTrainShards(self.train_urls, self.batch_size, batches, self.scaling, self.sample_posterior,
                                    self.flip, buffer, self.seed, rank)
        return PositionedLoader(dataset, self._train_start, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                 persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if not hasattr(self, "val_urls"):
            self.setup("validate")
        if not self.val_urls:
            return []
        rank, world_size = self._rank_world()
        dataset = LatentValShards(self.val_urls, self.val_batch_size, self.scaling, rank, world_size,
                                  self.num_workers)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)
