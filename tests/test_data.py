"""Reading shards back: transforms, batch format, exact validation split over ranks x workers, training
stream, decode failures at training time, the default photos and a Lightning run."""

import io
import random
import tarfile
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcssdae.data import (
    ImageDecodeError,
    ImageNetDataModule,
    TrainShards,
    ValShards,
    collate,
    decode_image,
    split_assignment,
    train_transform,
    val_transform,
)
from dcssdae.shards import Item, write_shards

S = 32  # tiny crops keep the tests fast


def jpeg(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def make_shards(root, n: int, shard_size: int, prefix: str = "val") -> str:
    """n small labelled JPEGs (varied sizes, some smaller than the crop) as shards; returns the pattern."""
    items = [
        Item(f"img{i:03d}", i % 3, f"mem{i}", jpeg(20 + 7 * (i % 5), 16 + 5 * (i % 4), i)) for i in range(n)
    ]
    manifest = write_shards(items, root, prefix, shard_size, classes=["a", "b", "c"], progress=False)
    return str(root / manifest["pattern"])


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ------------------------------------------------------------------------------------------------
# Transforms and batch format


def test_transforms_shapes_and_small_images():
    rng = random.Random(0)
    tiny = Image.new("RGB", (8, 8), (255, 0, 0))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 300, 3), dtype=np.uint8))
    for img in (tiny, wide):
        assert val_transform(img, S).size == (S, S)
        for aug_scale in (1.0, 2.0):
            assert train_transform(img, S, aug_scale, rng).size == (S, S)
    assert val_transform(tiny, S).getpixel((5, 5)) == (255, 0, 0)  # upscaled, not padded


def test_val_transform_is_resize_then_centre_crop():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    ref = img.resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    assert np.array_equal(np.asarray(val_transform(img, S)), np.asarray(ref))
    exact = img.crop((0, 0, 32, 40))  # short side already S: a pixel-exact centre crop
    assert np.array_equal(np.asarray(val_transform(exact, S)), np.asarray(exact)[4:36])


def test_train_transform_zoom_and_flip():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    outs = [np.asarray(train_transform(img, S, 1.0, random.Random(seed))) for seed in range(20)]
    a = np.asarray(img)
    assert all(np.array_equal(o, a) or np.array_equal(o, a[:, ::-1]) for o in outs)  # no zoom: crop = image
    assert any(np.array_equal(o, a[:, ::-1]) for o in outs) and any(np.array_equal(o, a) for o in outs)
    zoomed = [np.asarray(train_transform(img, S, 3.0, random.Random(seed))) for seed in range(5)]
    assert not any(np.array_equal(z, a) for z in zoomed)


def encoded(fmt: str, w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_errors_name_the_real_format(fmt):
    # Cut in the signature, in the header (PIL fails while opening: it has not named the format yet), and in the
    # pixel data (PIL named it, decoding fails); the error names the format every time.
    data = encoded(fmt)
    for n in (2, 4, 10, 20, 30, 40, 100, len(data) // 2, len(data) - 30):
        with pytest.raises(ImageDecodeError, match=f"^corrupt or truncated {fmt}\\b"):
            decode_image(data[:n])
    assert decode_image(data).size == (48, 40)
    with pytest.raises(ImageDecodeError, match="^not an image"):
        decode_image(b"GIF" + data[3:])  # a damaged signature is not recognisable as anything


def test_collate_range_and_types():
    black, white = Image.new("RGB", (S, S)), Image.new("RGB", (S, S), (255, 255, 255))
    batch = collate([black, white], [2, -1], ["x", "y"])
    assert batch["image"].shape == (2, 3, S, S) and batch["image"].dtype == torch.float32
    assert batch["image"][0].eq(-1).all() and batch["image"][1].eq(1).all()
    assert (
        batch["label"].dtype == torch.long
        and batch["label"].tolist() == [2, -1]
        and batch["key"] == ["x", "y"]
    )


def test_datamodule_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        ImageNetDataModule("a.tar", "b.tar", image_size=100)
    with pytest.raises(ValueError, match="aug_scale"):
        ImageNetDataModule("a.tar", "b.tar", aug_scale=0.5)
    with pytest.raises(FileNotFoundError, match="2 of 3 shards do not exist, e.g. .*missing-000000.tar"):
        ImageNetDataModule(str(tmp_path / "missing-{000000..000001}.tar"), __file__).setup("fit")


# ------------------------------------------------------------------------------------------------
# Validation: every image exactly once over ranks x workers


@pytest.mark.parametrize("n_shards, n_parts", [(s, p) for s in range(1, 8) for p in range(1, 10)])
def test_split_assignment_is_exact(n_shards, n_parts):
    counts = [5 + 3 * j for j in range(n_shards)]
    seen = Counter()
    for part in range(n_parts):
        for shard, m, r in split_assignment(n_shards, part, n_parts):
            seen.update((shard, i) for i in range(counts[shard]) if i % m == r)
    assert seen == Counter((j, i) for j in range(n_shards) for i in range(counts[j]))


@pytest.mark.parametrize(
    "shard_size", [3, 5]
)  # 5 shards (>= 4 readers: whole shards) or 3 (< 4: split inside)
def test_val_two_ranks_two_workers_cover_every_image_once(tmp_path, shard_size):
    urls = make_shards(tmp_path, 14, shard_size)
    per_rank = []
    for rank in range(2):
        dataset = ValShards(urls, S, batch_size=4, rank=rank, world_size=2, num_workers=2)
        batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
        assert len(batches) == len(dataset)  # length from the manifest is exact
        per_rank.append(keys_of(batches))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"img{i:03d}" for i in range(14)]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= shard_size


def test_val_batches(tmp_path):
    urls = make_shards(tmp_path, 7, 3)
    batches = list(ValShards(urls, S, batch_size=4, rank=0, world_size=1))
    assert [len(b["key"]) for b in batches] == [4, 3]  # batches run across shards; the last one is not padded
    b = batches[0]
    assert b["image"].shape == (4, 3, S, S) and b["image"].dtype == torch.float32
    assert -1 <= b["image"].min() and b["image"].max() <= 1 and b["skipped"] == 0
    assert b["label"].tolist() == [0, 1, 2, 0] and b["key"] == ["img000", "img001", "img002", "img003"]


# ------------------------------------------------------------------------------------------------
# Training stream


def test_train_loader_two_workers(tmp_path):
    train = make_shards(tmp_path / "train", 12, 4, "train")
    val = make_shards(tmp_path / "val", 5, 5)
    dm = ImageNetDataModule(
        train,
        val,
        image_size=S,
        aug_scale=2.0,
        batch_size=4,
        num_workers=2,
        train_epoch_size=30,
        shuffle_buffer=8,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 8  # ceil(30 / 4) = 8 batches, a multiple of 2 workers
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 8
        assert all(b["image"].shape == (4, 3, S, S) for b in batches)
        assert all(b["label"].dtype == torch.long and set(b["label"].tolist()) <= {0, 1, 2} for b in batches)
    assert keys_of(epochs[0]) != keys_of(epochs[1])  # a new random stream each epoch
    assert dm.classes == ["a", "b", "c"]
    assert sorted(keys_of(dm.val_dataloader())) == [f"img{i:03d}" for i in range(5)]


def test_train_streams_differ_by_rank(tmp_path):
    urls = make_shards(tmp_path, 12, 3, "train")
    rank0, rank1 = (TrainShards(urls, S, 1.0, 4, 3, shuffle_buffer=4, seed=0, rank=r) for r in (0, 1))
    first = keys_of(rank0)
    assert len(first) == 12 and first != keys_of(rank1)
    assert keys_of(rank0) != first  # iterated again (next epoch): a new draw
    assert keys_of(TrainShards(urls, S, 1.0, 4, 3, shuffle_buffer=4, seed=0, rank=0)) == first  # reproducible


def test_train_skips_undecodable_samples(tmp_path, caplog):
    path = tmp_path / "broken-000000.tar"
    with tarfile.open(path, "w") as tar:  # written by hand: the shard writer would reject these

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("good.jpg", jpeg(40, 40, 0))
        add("good.cls", b"1")
        add("bad.jpg", b"not a jpeg")
        add("noimage.txt", b"text only")
        add("cut.jpg", jpeg(40, 40, 1)[:300])
    dm = ImageNetDataModule(
        str(path), str(path), image_size=S, batch_size=2, num_workers=0, train_epoch_size=6
    )
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="dcssdae.data"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(b["key"] == ["good", "good"] for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 3 * 3 and "bad" in caplog.text and "not an image" in caplog.text
    for b in batches:
        dm.on_before_batch_transfer(b, 0)
        assert set(b) == {"image", "label", "key"}
    assert dm.skipped_samples["val"] == skipped  # no trainer attached: counted as validation


# ------------------------------------------------------------------------------------------------
# Default photos and a Lightning run


def test_default_photos(tmp_path, monkeypatch):
    from dcssdae.data import expand_urls, read_shard
    from dcssdae.photos import DEV, PHOTOS, TEST, ensure_default_photos

    urls = ensure_default_photos(tmp_path / "photos")
    assert set(urls) == {"train", "dev"}  # test and crops are written only when asked for
    assert urls["train"].endswith("train-{000000..000014}.tar") and urls["dev"].endswith("dev-{000000..000000}.tar")
    stamp = (tmp_path / "photos" / "dev" / "dev-000000.tar").stat().st_mtime_ns
    assert ensure_default_photos(tmp_path / "photos") == urls
    assert (tmp_path / "photos" / "dev" / "dev-000000.tar").stat().st_mtime_ns == stamp  # not rewritten
    train_keys = {s["__key__"] for u in expand_urls(urls["train"]) for s in read_shard(u)}
    assert len(train_keys) == len(PHOTOS) - len(DEV) - len(TEST) == 57
    assert not train_keys & (set(DEV) | set(TEST))

    monkeypatch.setenv("DCSSDAE_DATA", str(tmp_path))
    dm = ImageNetDataModule(image_size=64, val_image_size=96, batch_size=19, num_workers=0)
    dm.setup("fit")
    keys = keys_of(dm.val_dataloader())
    assert sorted(keys) == sorted(DEV)  # validation: the dev photos, whole
    assert next(iter(dm.val_dataloader()))["image"].shape[-2:] == (96, 96)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # epoch = the 57 training photos, batches of 19
    assert not set(keys_of(batches)) & set(keys)  # validation photos never trained on


class _Probe(L.LightningModule):
    """Records what reaches the LightningModule."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.val_keys, self.batch_fields = [], set()

    def training_step(self, batch, batch_idx):
        self.batch_fields |= set(batch)
        return (batch["image"].mean() - self.w) ** 2

    def validation_step(self, batch, batch_idx):
        self.batch_fields |= set(batch)
        self.val_keys += batch["key"]

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return batch["key"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
def test_lightning_fit(tmp_path):
    train = make_shards(tmp_path / "train", 6, 3, "train")
    val = make_shards(tmp_path / "val", 5, 2)
    dm = ImageNetDataModule(train, val, image_size=S, batch_size=2, num_workers=0)
    model = _Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3  # 6 images per epoch (from the manifest) / batch 2
    assert sorted(model.val_keys) == [f"img{i:03d}" for i in range(5)]
    assert model.batch_fields == {"image", "label", "key"}
    assert dm.skipped_samples == {"train": 0, "val": 0}


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
def test_test_and_predict_read_every_validation_image_once(tmp_path):
    val = make_shards(tmp_path / "val", 5, 2)
    dm = ImageNetDataModule(val, val, image_size=S, batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    model = _Probe()
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.val_keys == [f"img{i:03d}" for i in range(5)]
    predicted = trainer.predict(model, datamodule=dm)
    assert [k for keys in predicted for k in keys] == [f"img{i:03d}" for i in range(5)]


class _GatherKeys(_Probe):
    """Gathers the validation keys of all ranks and writes them (rank 0) to a file."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def on_validation_epoch_end(self):
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, self.val_keys)
        if self.trainer.global_rank == 0:
            with open(self.out, "w") as f:
                f.write("\n".join(f"{rank} {k}" for rank, keys in enumerate(gathered) for k in keys))


@pytest.mark.slow
def test_ddp_two_ranks_validation_exactly_once(tmp_path):
    train = make_shards(tmp_path / "train", 8, 4, "train")
    val = make_shards(tmp_path / "val", 11, 4)  # 3 shards, 2 ranks x 2 workers = 4 readers
    dm = ImageNetDataModule(train, val, image_size=S, batch_size=2, num_workers=2)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(_GatherKeys(tmp_path / "keys.txt"), datamodule=dm)
    lines = [line.split() for line in (tmp_path / "keys.txt").read_text().splitlines()]
    assert sorted(k for _, k in lines) == [f"img{i:03d}" for i in range(11)]
    assert {r for r, _ in lines} == {"0", "1"}


def test_held_out_crops_and_default_split(tmp_path, monkeypatch):
    """`val_shards: default:crops` reads the views of the dev photos; none is a training or test photo."""
    from dcssdae import photos

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8))
    views = photos.held_out_crops("x", img, count=5, size=64)
    assert [k for k, _, _ in views] == [f"x_crop{i:02d}" for i in range(5)]
    assert all(v.size == (64, 64) for _, v, _ in views)
    assert all(0 <= left and 0 <= top and left + side <= 451 and top + side <= 301 for _, _, (left, top, side) in views)
    assert [b for _, _, b in views] == [b for _, _, b in photos.held_out_crops("x", img, count=5, size=64)]

    monkeypatch.setattr(photos, "CROPS_PER_PHOTO", 2)
    monkeypatch.setenv("DCSSDAE_DATA", str(tmp_path))
    dm = ImageNetDataModule(image_size=64, val_shards="default:crops", batch_size=4, num_workers=0)
    dm.setup("validate")
    keys = keys_of(dm.val_dataloader())
    assert sorted(keys) == sorted(f"{k}_crop{i:02d}" for k in photos.DEV for i in range(2))
    with pytest.raises(ValueError, match="unknown default photo split"):
        photos.ensure_default_photos(tmp_path / "p", splits=("tiles",))
    with pytest.raises(ValueError, match="unknown default photo split"):
        photos.ensure_default_photos(tmp_path / "p", splits=("val",))  # the former name of dev
