"""Tests of dcssdae.export: export directory round trip, checkpoint reading, reconstruct and latent-stats tools."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dcssdae.autoencoder import DCSSDAE
from dcssdae.export import ToolError, export_checkpoint, load_model, main_export, write_export
from dcssdae.latent_stats import main_latent_stats, measure_latent_stats
from dcssdae.reconstruct import main_reconstruct

SIZE = 64  # tiny-f8c4 + tiny decoder: 8 x 8 latents


def tiny_model(seed: int = 0) -> DCSSDAE:
    """Tiny DCSSDAE with every weight perturbed, so that outputs depend on all of them (no zero-init shortcuts)."""
    torch.manual_seed(seed)
    model = DCSSDAE("tiny-f8c4", "tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def decode_fixed(model: DCSSDAE, x: torch.Tensor, steps: int = 1) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.decode(model.encode(x), noise=noise, steps=steps)


def fake_checkpoint(path, ema_model: DCSSDAE, live_model: DCSSDAE | None, step: int = 123) -> None:
    """A checkpoint in the layout of dcssdae.callbacks (EMA in state_dict, live in current_model_state)."""
    checkpoint = {
        "epoch": 1,
        "global_step": step,
        "state_dict": {f"ae.{k}": v for k, v in ema_model.state_dict().items()} | {"lpips.w": torch.zeros(1)},
        "dcssdae_config": ema_model.config(),
    }
    if live_model is not None:
        checkpoint["current_model_state"] = {f"ae.{k}": v for k, v in live_model.state_dict().items()}
        checkpoint["callbacks"] = {"EMA": {"num_updates": 7, "decay": 0.999, "start_step": 0}}
    torch.save(checkpoint, path)


def images_in(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x, generator=torch.Generator().manual_seed(5)) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Export directory


def test_export_then_reload_gives_identical_outputs(tmp_path):
    model = tiny_model()
    out = write_export(model, tmp_path / "export", {"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["export"]["format"] == "dcssdae-export-1" and config["export"]["note"] == "test"
    assert {k: v for k, v in config.items() if k != "export"} == json.loads(json.dumps(model.config()))

    reloaded = load_model(out)
    assert reloaded.config() == model.config()
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = images_in((1, 3, SIZE, SIZE))
    assert torch.equal(decode_fixed(model, x, steps=2), decode_fixed(reloaded, x, steps=2))


def test_from_pretrained_reads_an_export(tmp_path):
    """The public loader (DCSSDAE.from_pretrained) accepts what `dcssdae export` writes."""
    model = tiny_model()
    write_export(model, tmp_path / "export")
    x = images_in((1, 3, SIZE, SIZE))
    assert torch.equal(decode_fixed(model, x), decode_fixed(DCSSDAE.from_pretrained(tmp_path / "export"), x))


def test_config_round_trip_keeps_non_default_settings(tmp_path):
    from dcssdae.objectives import FlowMatching

    model = DCSSDAE("tiny-f8c4", "tiny", corruption=FlowMatching(), sampler={"method": "euler", "steps": 3},
                    latent_scale=0.5, latent_shift=0.25)
    reloaded = load_model(write_export(model, tmp_path / "fm"))
    assert isinstance(reloaded.corruption, FlowMatching)
    assert reloaded.config() == model.config()
    assert (reloaded.sampler, reloaded.latent_scale, reloaded.latent_shift) == ({"method": "euler", "steps": 3},
                                                                                  0.5, 0.25)


def test_write_export_refuses_existing_dir_unless_overwrite(tmp_path):
    model = tiny_model()
    write_export(model, tmp_path / "export")
    with pytest.raises(ToolError, match="already exists.*--overwrite"):
        write_export(model, tmp_path / "export")
    other = tiny_model(seed=1)
    write_export(other, tmp_path / "export", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    reloaded = load_model(tmp_path / "export")
    assert torch.equal(next(iter(reloaded.state_dict().values())), next(iter(other.state_dict().values())))


# ----------------------------------------------------------------------------------------------------------------
# From a checkpoint


def test_export_checkpoint_takes_ema_by_default_and_live_with_no_ema(tmp_path, capsys):
    ema, live = tiny_model(seed=0), tiny_model(seed=1)
    fake_checkpoint(tmp_path / "run.ckpt", ema, live, step=123)
    assert main_export([str(tmp_path / "run.ckpt"), str(tmp_path / "ema")]) == 0
    assert "ema weights" in capsys.readouterr().out
    assert main_export([str(tmp_path / "run.ckpt"), str(tmp_path / "live"), "--no-ema"]) == 0
    x = images_in((1, 3, SIZE, SIZE))
    assert torch.equal(decode_fixed(load_model(tmp_path / "ema"), x), decode_fixed(ema, x))
    assert torch.equal(decode_fixed(load_model(tmp_path / "live"), x), decode_fixed(live, x))
    meta = json.loads((tmp_path / "ema" / "config.json").read_text())["export"]
    assert meta["global_step"] == 123 and meta["epoch"] == 1 and meta["weights"] == "ema"
    assert meta["ema"]["num_updates"] == 7 and meta["source_checkpoint"].endswith("run.ckpt")
    assert meta["date"] and meta["dcssdae_version"]
    assert json.loads((tmp_path / "live" / "config.json").read_text())["export"]["weights"] == "training"


def test_export_checkpoint_without_ema_warns_and_exports_training_weights(tmp_path):
    model = tiny_model()
    fake_checkpoint(tmp_path / "noema.ckpt", model, None)
    with pytest.warns(UserWarning, match="no EMA"):
        out = export_checkpoint(tmp_path / "noema.ckpt", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["export"]["weights"].startswith("training")


def test_export_bad_paths_give_clear_errors(tmp_path, capsys):
    def run(*argv):
        code = main_export([str(a) for a in argv])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "missing.ckpt", tmp_path / "out")
    assert code == 2 and "checkpoint not found" in err and "missing.ckpt" in err
    code, err = run(tmp_path, tmp_path / "out")
    assert code == 2 and "is a directory" in err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    code, err = run(tmp_path / "junk.ckpt", tmp_path / "out")
    assert code == 2 and "cannot read" in err
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    code, err = run(tmp_path / "other.ckpt", tmp_path / "out")
    assert code == 2 and "not a checkpoint written by `dcssdae fit`" in err
    fake_checkpoint(tmp_path / "run.ckpt", tiny_model(), tiny_model(1))
    (tmp_path / "taken").mkdir()
    code, err = run(tmp_path / "run.ckpt", tmp_path / "taken")
    assert code == 2 and "already exists" in err
    assert not (tmp_path / "out").exists()


def test_export_rejects_weights_that_do_not_match_the_config(tmp_path, capsys):
    model = tiny_model()
    fake_checkpoint(tmp_path / "run.ckpt", model, None)
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    checkpoint["dcssdae_config"]["decoder_overrides"] = {"channels": 8}
    torch.save(checkpoint, tmp_path / "run.ckpt")
    with pytest.warns(UserWarning):
        assert main_export([str(tmp_path / "run.ckpt"), str(tmp_path / "out")]) == 2
    assert "do not match" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(ToolError, match="no model at"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolError, match="config.json is missing"):
        load_model(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
# dcssdae reconstruct


def write_png(path, seed: int, size: int = SIZE, width: int | None = None) -> np.ndarray:
    """A smooth random RGB image, size x size (or width wide)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width or size, size), Image.BICUBIC)
    img.save(path)
    return np.asarray(img)


def test_reconstruct_two_images_and_one_corrupt_file(tmp_path, capsys):
    write_export(tiny_model(), tmp_path / "export")
    a, b = write_png(tmp_path / "a.png", 0), write_png(tmp_path / "b.jpg.png", 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    argv = [str(tmp_path / "a.png"), str(tmp_path / "broken.png"), str(tmp_path / "b.jpg.png"),
            "--out", str(tmp_path / "rec"), "--model", str(tmp_path / "export"), "--size", str(SIZE)]
    assert main_reconstruct(argv) == 1  # one file failed
    captured = capsys.readouterr()
    assert "broken.png: cannot read" in captured.out and "corrupt" in captured.out
    assert "broken.png" in captured.err
    outputs = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert outputs == ["a.png", "b.jpg.png", "psnr.tsv"]
    for name, original in (("a.png", a), ("b.jpg.png", b)):
        pair = np.asarray(Image.open(tmp_path / "rec" / name))
        assert pair.shape == (SIZE, 2 * SIZE, 3)
        assert np.array_equal(pair[:, :SIZE], original)  # left: input, right: reconstruction
        right = pair[:, SIZE:].astype(np.float64)
        expected = 10 * math.log10(255**2 / np.mean((right - original) ** 2))
        line = next(l for l in captured.out.splitlines() if l.startswith(str(tmp_path / name)))
        assert f"PSNR {expected:.2f} dB" in line
    rows = (tmp_path / "rec" / "psnr.tsv").read_text().splitlines()
    assert rows[0] == "image\tpsnr_db\toutput" and len(rows) == 3


def test_reconstruct_is_deterministic_and_errors_are_clear(tmp_path, capsys):
    write_export(tiny_model(), tmp_path / "export")
    write_png(tmp_path / "a.png", 0)
    common = ["--model", str(tmp_path / "export"), "--size", str(SIZE)]
    assert main_reconstruct([str(tmp_path / "a.png"), "--out", str(tmp_path / "r1"), *common]) == 0
    assert main_reconstruct([str(tmp_path / "a.png"), "--out", str(tmp_path / "r2"), *common]) == 0
    assert (tmp_path / "r1" / "a.png").read_bytes() == (tmp_path / "r2" / "a.png").read_bytes()
    capsys.readouterr()
    assert main_reconstruct([str(tmp_path / "a.png"), "--out", str(tmp_path / "r3"), "--model",
                             str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main_reconstruct([str(tmp_path / "a.png"), "--out", str(tmp_path / "r3"), *common[:2], "--size", "60",
                             "--no-pad"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main_reconstruct([str(tmp_path / "a.png"), "--out", str(tmp_path / "r3"), *common, "--sampler",
                             "euler"]) == 2
    assert "euler" in capsys.readouterr().err


def test_reconstruct_keeps_any_image_whole_at_its_size(tmp_path, capsys):
    """Default: no crop, sides padded to a multiple of f and cropped back; --no-pad refuses such a file; --tile
    decodes in tiles."""
    write_export(tiny_model(), tmp_path / "export")
    original = write_png(tmp_path / "odd.png", 0, size=45, width=70)  # 70 x 45: neither a multiple of 8
    write_png(tmp_path / "wide.png", 1, size=64, width=128)
    common = ["--model", str(tmp_path / "export")]
    assert main_reconstruct([str(tmp_path / "odd.png"), str(tmp_path / "wide.png"), "--out", str(tmp_path / "r"),
                             *common]) == 0
    pair = np.asarray(Image.open(tmp_path / "r" / "odd.png"))
    assert pair.shape == (45, 140, 3) and np.array_equal(pair[:, :70], original)
    assert np.asarray(Image.open(tmp_path / "r" / "wide.png")).shape == (64, 256, 3)
    capsys.readouterr()
    assert main_reconstruct([str(tmp_path / "odd.png"), "--out", str(tmp_path / "r2"), *common, "--no-pad"]) == 1
    assert "not a multiple of the encoder's downsampling factor 8" in capsys.readouterr().out
    assert main_reconstruct([str(tmp_path / "wide.png"), "--out", str(tmp_path / "r3"), *common, "--tile", "64",
                             "--overlap", "32"]) == 0
    tiled = np.asarray(Image.open(tmp_path / "r3" / "wide.png")).astype(np.float64)[:, 128:]
    whole = np.asarray(Image.open(tmp_path / "r" / "wide.png")).astype(np.float64)[:, 128:]
    assert tiled.shape == whole.shape and not np.array_equal(tiled, whole)  # the tiles did change the evaluation


# ----------------------------------------------------------------------------------------------------------------
# dcssdae latent-stats


def raw_latents(model: DCSSDAE, files) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        return model.encoder(x.float() / 127.5 - 1).mode().double()


def test_latent_stats_writes_scale_into_the_export(tmp_path, capsys):
    model = tiny_model()
    write_export(model, tmp_path / "export")
    data = tmp_path / "images"
    data.mkdir()
    files = [data / f"{i}.png" for i in range(5)]
    for i, f in enumerate(files):
        write_png(f, i)
    (data / "notes.txt").write_text("ignored: not an image suffix")
    z = raw_latents(model, files)
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(data), "--size", str(SIZE),
                              "--batch-size", "2"]) == 0
    assert "latent_scale" in capsys.readouterr().out
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["latent_scale"] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)
    assert config["latent_shift"] == 0.0
    stats = config["export"]["latent_stats"]
    assert stats["num_images"] == 5 and stats["num_values"] == z.numel() and stats["shift"] is False
    # The scaled latents of the reloaded model have unit standard deviation on the same data.
    reloaded = load_model(tmp_path / "export")
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]).float() / 127.5 - 1
    with torch.no_grad():
        assert reloaded.encode(x).double().std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)

    # --shift also centres them; --num-images limits the data.
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(data), "--size", str(SIZE), "--shift",
                              "--num-images", "3"]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["latent_shift"] == pytest.approx(z[:3].mean().item(), rel=1e-6, abs=1e-9)
    assert config["latent_scale"] == pytest.approx(1 / z[:3].std(unbiased=False).item(), rel=1e-6)
    assert config["export"]["latent_stats"]["num_images"] == 3
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]


def test_latent_stats_reads_shards(tmp_path):
    import webdataset as wds

    model = tiny_model()
    write_export(model, tmp_path / "export")
    files = [tmp_path / f"{i}.png" for i in range(3)]
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as sink:
        for i, f in enumerate(files):
            write_png(f, i)
            sink.write({"__key__": f"img{i}", "png": f.read_bytes(), "cls": b"-1"})
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(tmp_path / "val-000000.tar"), "--size",
                              str(SIZE)]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["latent_scale"] == pytest.approx(1 / raw_latents(model, files).std(unbiased=False).item(), rel=1e-6)


def test_latent_stats_bad_inputs(tmp_path, capsys):
    fake_checkpoint(tmp_path / "run.ckpt", tiny_model(), None)
    assert main_latent_stats([str(tmp_path / "run.ckpt"), "--data", str(tmp_path)]) == 2
    assert "not an export directory" in capsys.readouterr().err
    write_export(tiny_model(), tmp_path / "export")
    (tmp_path / "empty").mkdir()
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(tmp_path / "empty")]) == 2
    assert "no .tar shards and no image files" in capsys.readouterr().err
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(tmp_path / "x-{000..001}.tar")]) == 2
    assert "not found" in capsys.readouterr().err
    assert json.loads((tmp_path / "export" / "config.json").read_text())["latent_scale"] == 1.0  # untouched


def test_measure_latent_stats_is_exact_for_large_means():
    """float64 + pairwise merging: mean 1e4, std 1e-2 (E[z^2] - E[z]^2 would lose every digit in float32)."""

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.encoder = self

        def forward(self, x):
            return self

        def mode(self):
            return self.z

    z_all = 1e4 + 1e-2 * torch.randn(10, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Fixed()

    def batches():
        for i in range(0, 10, 3):
            model.z = z_all[i:i + 3]
            yield {"image": torch.zeros(model.z.shape[0], 3, 8, 8)}

    stats = measure_latent_stats(model, batches())
    assert stats["num_images"] == 10
    assert stats["mean"] == pytest.approx(z_all.mean().item(), rel=1e-12)
    assert stats["std"] == pytest.approx(z_all.std(unbiased=False).item(), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# A real checkpoint from Lightning (DCSSDAESystem + the EMA callback)


@pytest.mark.slow  # a 3-step Lightning fit: ~15 s alone on 2 cores, much more when they are shared
def test_export_of_a_lightning_checkpoint_holds_the_ema_weights(tmp_path):
    import lightning.pytorch as pl

    from dcssdae.callbacks import EMA
    from dcssdae.losses import LossWeights
    from dcssdae.system import DCSSDAESystem

    system = DCSSDAESystem(encoder="tiny-f8c4", decoder="tiny", lr=1e-2, val_rfid=False, val_lpips=None,
                           loss_weights=LossWeights(lpips=0, stlpips=0, repa=0))
    batches = [{"image": images_in((2, 3, SIZE, SIZE)), "label": torch.full((2,), -1), "key": ["a", "b"]}] * 3
    # Saved during training (at step 3): after fit the EMA callback copies the EMA into the module.
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="run", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[EMA(decay=0.5), saver], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)

    assert main_export([str(tmp_path / "run.ckpt"), str(tmp_path / "ema")]) == 0
    assert main_export([str(tmp_path / "run.ckpt"), str(tmp_path / "live"), "--no-ema"]) == 0
    ema, live = load_model(tmp_path / "ema").state_dict(), load_model(tmp_path / "live").state_dict()
    for name in ema:
        assert torch.equal(ema[name], checkpoint["state_dict"]["ae." + name]), name
        assert torch.equal(live[name], checkpoint["current_model_state"]["ae." + name]), name
    assert any(not torch.equal(ema[n], live[n]) for n in ema)  # the EMA lags the trained weights
    meta = json.loads((tmp_path / "ema" / "config.json").read_text())["export"]
    assert meta["global_step"] == 3 and meta["weights"] == "ema"
