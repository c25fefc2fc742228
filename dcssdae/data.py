"""Image data: WebDataset shards -> batches `{"image": (B,3,S,S) in [-1,1], "label": (B,), "key": [str]}`.

`ImageNetDataModule`, the data module LightningCLI configures, and where its data comes from (shards, or the default
photos). The streaming datasets it loads are in `dcssdae/datasets.py`; decoding one image (any mode -> RGB) and the
train / validation transforms in `dcssdae/images.py` (both re-exported here, so `dcssdae.data` is the one import).

Conventions (shared with the whole project):
  * images are float32, NCHW, RGB, in [-1, 1] (uint8 value v becomes v / 127.5 - 1);
  * `label` is a long tensor, -1 where the class is unknown (e.g. the default photos);
  * `key` is the sample's `__key__` in its shard (unique within a data set).
"""

from __future__ import annotations

import logging
import math

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from dcssdae.datasets import (  # noqa: F401 (re-exported)
    PositionedLoader,
    TrainingDataError,
    TrainingPosition,
    TrainShards,
    ValShards,
    _dist_rank_world,
    _local_path,
    collate,
    expand_urls,
    manifest_classes,
    read_shard,
    shard_counts,
    split_assignment,
)
from dcssdae.images import (  # noqa: F401 (re-exported: decoding and transforms live in dcssdae.images)
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    color_matrix,
    decode_image,
    to_rgb,
    train_transform,
    val_transform,
)
from dcssdae.latent_data import LatentDataModule, LatentScaling  # noqa: F401 (re-exported: latent shards)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The DataModule.


def _default_split(urls: str | list[str] | None, split: str) -> str | None:
    """The default photo split named by `urls`: None / "default" -> `split`; "default:<name>" -> <name>; else None."""
    if urls is None or urls == "default":
        return split
    if isinstance(urls, str) and urls.startswith("default:"):
        return urls.removeprefix("default:")
    return None


# The default photo split each stage reads (dcssdae.photos): validation scores the photos that choose settings, test
# the photos that are only reported.
DEFAULT_PHOTO_SPLITS = {"train": "train", "val": "dev", "test": "test"}


def _resolve_default(train: str | list[str] | None, val: str | list[str] | None,
                     test: str | list[str] | None = None, with_test: bool = False):
    """(train, val, test) with None / "default" / "default:<split>" replaced by the default photo shards (written on
    first use, see dcssdae.photos): "default" is the stage's split (`DEFAULT_PHOTO_SPLITS`: train, dev, test);
    "default:crops" the 216 views of the dev photos. The test shards are resolved (and written) only `with_test`;
    test None reads the default test photos when validation reads default photos, else the validation data (a data
    set without a public test split, e.g. ImageNet's validation images)."""
    names = DEFAULT_PHOTO_SPLITS
    if test is None:
        test = "default" if _default_split(val, names["val"]) else val
    splits = {"train": _default_split(train, names["train"]), "val": _default_split(val, names["val"]),
              "test": _default_split(test, names["test"]) if with_test else None}
    if not any(splits.values()):
        return train, val, test
    from dcssdae.photos import ensure_default_photos

    urls = ensure_default_photos(splits=tuple(dict.fromkeys(s for s in splits.values() if s)))
    return tuple(urls[splits[stage]] if splits[stage] else given
                 for stage, given in (("train", train), ("val", val), ("test", test)))


class ImageNetDataModule(TrainingPosition, L.LightningDataModule):
    """ImageNet (or any image set) from WebDataset shards, as `{"image", "label", "key"}` batches.

    Training streams shards drawn with replacement (every rank and worker sees different data, and an
    epoch has a fixed number of batches on every rank). Validation reads every image exactly once
    over all ranks and workers (no padding, no duplicates; the last batches may be smaller and ranks
    may get one batch more or less than others).

    Samples that fail to decode are skipped and logged (key and reason); the counts are in
    `skipped_samples` ({"train": n, "val": n}, summed over workers on this rank). Batches from the
    data loaders themselves also carry "skipped" (per-batch count), which this module removes in
    `on_before_batch_transfer` before the batch reaches the LightningModule.

    Resuming (`fit --ckpt_path`) continues the training data exactly where the checkpointed run was: the
    module's `state_dict` (saved in the checkpoint) holds the position (epoch, batch) after the last batch
    trained on, and the training stream is a pure function of its position (see `TrainShards`). This holds
    for the same shards, seed, batch size, workers, world size and epoch size.

    The default data (train/val shards None or "default") are the real photos shipped in the
    scikit-image, scikit-learn and matplotlib wheels, written as shards under `$DCSSDAE_DATA/photos`
    (or `./data/photos`) on first use; see `dcssdae photos`.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        image_size: int = 256,
        val_image_size: int | None = None,
        aug_scale: float = 1.0,
        aug_color: float = 0.0,
        aug_permute: float = 0.0,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        shuffle_buffer: int = 1000,
        train_epoch_size: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        """
        Args:
            train_shards: training shard URLs: a brace pattern
                ("data/imagenet/train/train-{000000..001281}.tar"), a "::"-joined list, or a list; local
                paths or anything webdataset opens (http(s)://, pipe:..., s3/gs through pipe:).
                None or "default": the default photo shards.
            val_shards: validation shard URLs, same forms as `train_shards` ("default": the photos that choose
                settings).
            test_shards: shard URLs that `dcssdae test` scores, same forms ("default": the default photos' test
                split, never used to choose a setting). None: "default" when val_shards is the default photos, else
                the validation shards (e.g. ImageNet, whose labelled test split is not public).
            image_size: side S of the square crops; a multiple of 32 (256 or 512 in the DC-AE/SSDD recipe).
            val_image_size: side of the validation / test / predict images (short side resized, centre crop);
                None: `image_size`. E.g. train on 128 px crops, score whole photos at 256 px.
            aug_scale: training zoom: the short side is drawn uniformly in [S, S * aug_scale] before the
                random S crop. 1.0 (default) crops at the scale validation sees. SSDD's phase 1 used 2.0 at
                128 px, where ImageNet photos (short side ~350 px) are still downscaled; at 256 px a factor 2
                would upsample most ImageNet photos, so each recipe sets it.
            aug_color: colour augmentation of training crops: hue rotated by U[-pi a, pi a] about the grey axis,
                saturation scaled by exp(U[-a, a]); 0 (default): none. For small photo sets whose palette is
                narrow (the default photos: 0.5); ImageNet recipes leave it at 0.
            aug_permute: probability that a training crop's RGB channels are put in a random order (one of the
                6 orders); 0 (default): never. Like `aug_color`, for small photo sets; ImageNet recipes leave it 0.
            batch_size: training images per batch on each rank.
            val_batch_size: validation images per batch on each rank (default: `batch_size`).
            num_workers: DataLoader worker processes per rank (decoding and augmentation run there).
            shuffle_buffer: encoded samples held by each training worker for shuffling (ImageNet JPEGs are
                ~110 kB, so 1000 costs ~110 MB per worker); capped at the data set's size when known.
            train_epoch_size: training samples per epoch over all ranks together; each rank then runs
                ceil(train_epoch_size / (world_size * batch_size)) batches, rounded up to a multiple of
                `num_workers`. None: the number of training images in the shards' manifest (one pass in
                expectation; 1,281,167 for ImageNet-1k).
            seed: base seed of the training streams (mixed with rank, worker and epoch).
            pin_memory: pin batches in page-locked memory; None = when CUDA is available.
        """
        super().__init__()
        for name, size in (("image_size", image_size), ("val_image_size", val_image_size)):
            if size is not None and (size <= 0 or size % 32):
                raise ValueError(f"{name} must be a positive multiple of 32, got {size}")
        if aug_scale < 1.0:
            raise ValueError(
                f"aug_scale must be >= 1 (the short side is drawn in [S, S * aug_scale]), got {aug_scale}"
            )
        self._init_loading(batch_size, val_batch_size, num_workers, shuffle_buffer, train_epoch_size, seed, pin_memory)
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.image_size, self.aug_scale = image_size, aug_scale
        if aug_color < 0:
            raise ValueError(f"aug_color must be >= 0, got {aug_color}")
        if not 0 <= aug_permute <= 1:
            raise ValueError(f"aug_permute is a probability in [0, 1], got {aug_permute}")
        self.aug_color, self.aug_permute = aug_color, aug_permute
        self.val_image_size = val_image_size or image_size

    # -- Lightning hooks ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the default photo shards if they are used and missing (runs once per node)."""
        testing = self.trainer is not None and self.trainer.state.fn == "test"
        _resolve_default(self.train_shards, self.val_shards, self.test_shards, with_test=testing)

    def setup(self, stage: str | None = None) -> None:
        testing = stage == "test"
        train, val, test = _resolve_default(self.train_shards, self.val_shards, self.test_shards, with_test=testing)
        self.train_urls, self.val_urls = expand_urls(train), expand_urls(val)
        self.test_urls = expand_urls(test) if testing else None
        urls = self.train_urls + self.val_urls + (self.test_urls or [])
        missing = [p for p in map(_local_path, urls) if p is not None and not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]} "
                "(write shards with `dcssdae shards SRC OUT`)"
            )
        self.classes = manifest_classes(self.train_urls)
        if self.trainer is None or self.trainer.is_global_zero:  # where the run reads (default photos: built here)
            print(f"data: {len(self.train_urls)} training shards, e.g. {self.train_urls[0]}; "
                  f"{len(self.val_urls)} validation shards, e.g. {self.val_urls[0]}"
                  + (f"; {len(self.test_urls)} test shards, e.g. {self.test_urls[0]}" if testing else ""))

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "train_urls"):
            self.setup("fit")
        rank, world_size = self._rank_world()
        epoch_size = self.train_epoch_size
        counts = shard_counts(self.train_urls)
        if epoch_size is None:
            if counts is None:
                raise ValueError(
                    "train_epoch_size is needed: the training shards have no manifest.json with counts"
                )
            epoch_size = sum(counts)
        # A buffer larger than the data set adds only memory (small sets such as the default photos).
        buffer = self.shuffle_buffer if counts is None else max(1, min(self.shuffle_buffer, sum(counts)))
        workers = max(1, self.num_workers)
        batches = math.ceil(math.ceil(epoch_size / (world_size * self.batch_size)) / workers) * workers
        dataset = TrainShards(
            self.train_urls,
            self.image_size,
            self.aug_scale,
            self.batch_size,
            batches,
            buffer,
            self.seed,
            rank,
            self.aug_color,
            self.aug_permute,
        )
        return PositionedLoader(
            dataset,
            self._train_start,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, urls: list[str]) -> DataLoader:
        """Every image of `urls` exactly once across ranks and workers, at `val_image_size`."""
        rank, world_size = self._rank_world()
        dataset = ValShards(urls, self.val_image_size, self.val_batch_size, rank, world_size, self.num_workers)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        if not hasattr(self, "val_urls"):
            self.setup("validate")
        return self._eval_loader(self.val_urls)

    def test_dataloader(self) -> DataLoader:
        """`dcssdae test`: the test shards (`test_shards`), each image once across ranks."""
        if getattr(self, "test_urls", None) is None:
            self.setup("test")
        return self._eval_loader(self.test_urls)

    def predict_dataloader(self) -> DataLoader:
        """`dcssdae predict`: the validation images, each exactly once across ranks (as for validation)."""
        return self.val_dataloader()


