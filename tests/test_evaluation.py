"""Evaluation by the system and the command line: metric networks built once for every column and only when an
evaluation needs them, validation noise drawn per image (the same numbers on 1 and 2 processes), `dcssdae test` on
the data module's test split writing test_metrics.json in the layout of validate_metrics.json. Tiny presets."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dcssdae.data import DEFAULT_PHOTO_SPLITS, ImageNetDataModule
from dcssdae.losses import LossWeights
from dcssdae.system import DCSSDAESystem

TINY = {"encoder": "tiny-f32c8", "decoder": "tiny", "lpips_variant": "stlpips", "lpips_net": "alex",
        "val_rfid": False, "val_lpips": None, "val_steps": 2, "loss_weights": LossWeights(stlpips=0.0, repa=0.0)}


class KeyedImages(Dataset):
    def __init__(self, n: int = 4, size: int = 64):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": -1, "key": f"photo{i}"}


def validate(model: DCSSDAESystem, root: Path, n: int = 2, batch_size: int = 2) -> dict:
    """`trainer.validate` on n keyed images; returns validate_metrics.json."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    trainer.validate(model, DataLoader(KeyedImages(n), batch_size=batch_size), verbose=False)
    return json.loads((root / "validate_metrics.json").read_text())


def metric_parameters(model: torch.nn.Module) -> int:
    """Parameters of the module outside its autoencoder (metric networks, if any were built into it)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ae."))


def decoding_model(**settings) -> DCSSDAESystem:
    torch.manual_seed(0)
    model = DCSSDAESystem(**{**TINY, **settings})
    torch.nn.init.normal_(model.ae.decoder.out_conv.weight, std=0.1)  # zero at init: the noise would not matter
    return model


# ------------------------------------------------------------------------------------------------
# Metric networks: built once for every column, and only when an evaluation needs them.


def test_validation_builds_each_metric_network_once_for_every_column_and_not_before(tmp_path, monkeypatch):
    """Model, one step and bicubic: one Inception and one ST-LPIPS built, at the first validation batch (not with
    the system); the references go through Inception once, each column's reconstructions once; every column of the
    JSON holds the intervals, KID and the low-pass PSNR."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    from dcssdae import metric_networks

    built, images = [], []
    init, forward, perceptual = NoTrainInceptionV3.__init__, NoTrainInceptionV3.forward, \
        metric_networks.build_perceptual
    monkeypatch.setattr(NoTrainInceptionV3, "__init__",
                        lambda self, *a, **k: built.append("inception") or init(self, *a, **k))
    monkeypatch.setattr(NoTrainInceptionV3, "forward", lambda self, x: images.append(len(x)) or forward(self, x))
    monkeypatch.setattr(metric_networks, "build_perceptual", lambda v: built.append(v) or perceptual(v))
    model = decoding_model(val_rfid=True, val_lpips="stlpips_alex", val_extra_steps=[1], val_baseline="bicubic")
    assert built == [] and metric_parameters(model) == 0  # nothing built with the system
    report = validate(model, tmp_path, n=2)
    assert sorted(built) == ["inception", "stlpips_alex"]
    assert sum(images) == 2 * (1 + 3)  # 2 references once, then 3 columns of 2 reconstructions
    assert metric_parameters(model) == 0 and not [k for k in model.state_dict() if not k.startswith("ae.")]
    for column in (report, report["1 step"], report["bicubic"]):
        for name in ("psnr", "ssim", "lowpass_psnr", "stlpips_alex"):
            lo, hi = column[f"{name}_ci95"]
            assert lo <= column[name] <= hi, name
        assert {"kid", "kid_std", "kid_subset_size"} <= column.keys()
        assert "rfid" not in column and "2 images < 2048" in column["rfid_omitted"]
    assert report["num_images"] == 2 and report["nfe"] == 2 and report["1 step"]["nfe"] == 1


def test_a_checkpoint_opens_without_building_metric_networks(tmp_path):
    """load_from_checkpoint of a system that validates with rFID, KID and both ST-LPIPS builds none of their 41 M
    parameters; they come when an evaluation needs them."""
    model = DCSSDAESystem(**{**TINY, "val_rfid": True, "val_lpips": ["stlpips_alex", "stlpips_vgg"]})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=1, limit_val_batches=0, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(KeyedImages(2), batch_size=2))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = DCSSDAESystem.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.hparams.val_rfid and metric_parameters(loaded) == 0
    assert loaded.val_metrics.networks.built == {} and model.val_metrics.networks.built == {}  # fit built none


# ------------------------------------------------------------------------------------------------
# Validation noise: drawn per image from its key.


def test_validation_noise_does_not_depend_on_the_batches(tmp_path):
    """Each image decodes from its own noise (val_seed, key): alone or in a batch of 3, the same reconstruction, so
    the same numbers; another val_seed, another reconstruction (the noise matters to this decoder)."""
    model = decoding_model()
    images = KeyedImages(3)
    x, keys = images.images, [images[i]["key"] for i in range(3)]
    with torch.no_grad():
        together = model.reconstruct(x, keys)[0]
        alone = torch.cat([model.reconstruct(x[i:i + 1], keys[i:i + 1])[0] for i in range(3)])
        model.val_seed = 1
        other_seed = model.reconstruct(x, keys)[0]
        model.val_seed = 0
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
    assert (other_seed - together).abs().mean() > 0.05
    by_one = validate(model, tmp_path / "one", n=3, batch_size=1)
    by_three = validate(model, tmp_path / "three", n=3, batch_size=3)
    for name in ("psnr", "psnr_ci95", "lowpass_psnr", "ssim"):
        assert by_one[name] == pytest.approx(by_three[name], rel=1e-6, abs=1e-6), name


@pytest.fixture(scope="module")
def checkpoint(tiny_cli):
    """A 1-step quick-start checkpoint whose decoder output layer (zero at init) is random: the validation noise
    changes every reconstruction."""
    assert tiny_cli("fit", "evaluation", "--trainer.max_steps", "1") == 0
    state = torch.load(tiny_cli.last_ckpt("evaluation"), weights_only=True)
    weight = state["state_dict"]["ae.decoder.out_conv.weight"]
    state["state_dict"]["ae.decoder.out_conv.weight"] = 0.1 * torch.randn(
        weight.shape, generator=torch.Generator().manual_seed(0))
    torch.save(state, path := tiny_cli.work / "runs/evaluation/checkpoints/noisy.ckpt")
    return path


EVALUATION = ("--model.init_args.val_steps", "2", "--model.init_args.val_lpips", "stlpips_alex",
              "--model.init_args.val_extra_steps", "[1]")


def _report(name: str, command: str = "validate") -> dict:
    (path,) = Path("runs", name).rglob(f"{command}_metrics.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def validated(tiny_cli, checkpoint) -> dict:
    """validate_metrics.json of the checkpoint on the 8 dev photos, one process, batches of 2."""
    assert tiny_cli("validate", "one_process", "--ckpt_path", str(checkpoint), *EVALUATION) == 0
    return _report("one_process")


def test_the_same_checkpoint_validates_to_the_same_numbers_on_one_and_two_processes(tiny_cli, checkpoint, validated):
    """The 8 dev photos in batches of 2: 4 batches on one process, 2 on each of two gloo ranks (each rank takes every
    other photo, so the batches hold other images together). Every image gets the same noise either way, so every
    column's PSNR, ST-LPIPS, low-pass PSNR, SSIM and their intervals agree."""
    result = tiny_cli.subprocess("validate", "two_processes", "--ckpt_path", str(checkpoint), *EVALUATION,
                                 "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    one, two = validated, _report("two_processes")
    for column in (None, "1 step", "bicubic"):
        a, b = (one, two) if column is None else (one[column], two[column])
        assert a["num_images"] == b["num_images"] == 8
        for name in ("psnr", "stlpips_alex", "lowpass_psnr", "ssim"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), (column, name)
            # (the interval's ends are single resampled means: batch-size round-off moves them by a few 1e-6)
            assert b[f"{name}_ci95"] == pytest.approx(a[f"{name}_ci95"], rel=1e-5, abs=1e-5), (column, name)


# ------------------------------------------------------------------------------------------------
# `dcssdae test`: the data module's test split, test_metrics.json in the layout of validate_metrics.json.


def _layout(report: dict) -> dict:
    """Keys of the report, and of each of its columns (nested dicts), without the values."""
    return {k: sorted(v) if isinstance(v, dict) and k != "sampler" else None for k, v in report.items()}


def test_test_command_scores_the_test_split_and_writes_the_validate_layout(tiny_cli, checkpoint, validated):
    assert tiny_cli("test", "test_split", "--ckpt_path", str(checkpoint), *EVALUATION) == 0
    test = _report("test_split", "test")
    assert _layout(test) == _layout(validated) and {"1 step", "bicubic"} <= test.keys()
    assert "psnr_ci95" in test and "lowpass_psnr" in test["bicubic"] and "stlpips_alex_ci95" in test["1 step"]
    split = DEFAULT_PHOTO_SPLITS["test"]
    manifest = json.loads(next(Path("data/photos", split).glob("manifest.json")).read_text())
    assert test["num_images"] == manifest["total"] and test["checkpoint"] == str(checkpoint.absolute())


def test_test_shards_default_to_the_test_photos_or_to_the_validation_data(tiny_cli, tmp_path):
    from dcssdae.photos import ensure_default_photos

    splits = DEFAULT_PHOTO_SPLITS
    urls = ensure_default_photos(splits=tuple(dict.fromkeys(splits.values())))
    default = ImageNetDataModule(num_workers=0)
    default.setup("fit")
    assert default.test_urls is None  # fit neither reads nor writes the test photos
    default.setup("test")
    assert default.val_urls[0].startswith(urls[splits["val"]].split("{")[0])
    assert default.test_urls[0].startswith(urls[splits["test"]].split("{")[0])
    own = urls[splits["val"]]  # any shards given as validation data: test reads them too, unless told otherwise
    dm = ImageNetDataModule(train_shards="default", val_shards=own, num_workers=0)
    dm.setup("test")
    assert dm.test_urls == dm.val_urls
    dm = ImageNetDataModule(train_shards="default", val_shards=own, test_shards="default:train", num_workers=0)
    dm.setup("test")
    assert dm.test_urls == default.train_urls
    from dcssdae.shards import read_manifest

    batches = list(dm.test_dataloader())
    assert sum(len(b["key"]) for b in batches) == read_manifest(Path(default.train_urls[0]).parent)["total"]
    assert not math.isnan(batches[0]["image"].sum().item())
