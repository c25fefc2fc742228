"""Bad input through `dcssdae fit`: each case ends with a one-line message naming the problem (no traceback from
deep inside torch), or with a logged skip while training goes on."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from dcssdae.cli import main, run_lightning_cli
from dcssdae.shards import Item, write_shards


@pytest.fixture(scope="module")
def fit_args(tiny_cli):
    """`fit_args(NAME, *EXTRA)`: the command line of `dcssdae fit` on the quick-start config + tiny overlay."""
    return lambda name, *extra: tiny_cli.args("fit", name, *extra)


def fails_with(capsys, argv: list[str], *needles: str) -> str:
    """Run `dcssdae ARGV`; it must fail with a short message holding every needle and no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argument parsing errors exit (code 2) after printing usage + error
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def jpeg(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Clear errors


def test_unknown_variant_names(fit_args, capsys):
    fails_with(capsys, fit_args("bad", "--model.init_args.encoder", "dc-ae-f33c32"),
               "unknown encoder 'dc-ae-f33c32'", "known encoders:", "tiny-f32c8")
    fails_with(capsys, fit_args("bad", "--model.init_args.decoder", "XXL"), "unknown decoder 'XXL'")


def test_misspelt_config_key(fit_args, capsys, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    learning_rate: 0.1\n")
    fails_with(capsys, fit_args("bad", "--config", str(typo)), "error: Option 'learning_rate' is not accepted")
    fails_with(capsys, fit_args("bad", "--trainer.max_stepz", "3"), "unrecognized arguments: --trainer.max_stepz")
    typo.write_text("data:\n  batch_sise: 3\n")
    err = fails_with(capsys, fit_args("bad", "--config", str(typo)), "does not accept option 'data.batch_sise'")
    assert "did you mean --data.batch_size?" in err.splitlines()[0], err


def test_misspelt_option_error_comes_first_with_the_closest_name(fit_args, capsys):
    """The one line that matters is the first one printed, with a suggestion; no usage block before it."""
    for typo, guess in (("--model.lrr", "--model.lr"), ("--model.init_args.warmup_step", "--model.warmup_steps"),
                        ("--trainer.max_stepz", "--trainer.max_steps")):
        err = fails_with(capsys, fit_args("bad", typo, "3"))
        first = err.splitlines()[0]
        assert "error:" in first and typo.rsplit(".", 1)[-1] in first and f"did you mean {guess}?" in first, err
        assert len(err.splitlines()) <= 3 and "usage:" not in err and "--help" in err, err


def test_image_side_not_divisible_by_the_compression_factor(fit_args, capsys):
    # An f64 encoder (one more downsampling stage than tiny-f32c8) on 96 px crops: 96 is not a multiple of 64.
    f64 = ("{widths: [16, 16, 32, 32, 32, 32, 32], depths: [0, 1, 1, 1, 1, 1, 1], latent_channels: 8, "
           "block_types: [ResBlock, ResBlock, ResBlock, EViT, EViT, EViT, EViT]}")
    fails_with(capsys, fit_args("bad", "--model.init_args.encoder_overrides", f64, "--data.image_size", "96"),
               "96", "64")


def test_checkpoint_of_another_variant(fit_args, capsys):
    assert main(fit_args("small", "--trainer.max_steps", "1")) == 0
    ckpt = Path("runs/small/checkpoints/last.ckpt").resolve()
    wider = "{latent_channels: 16}"  # another latent width: the checkpoint's encoder/decoder heads do not fit
    fails_with(capsys, fit_args("other", "--model.init_args.encoder_overrides", wider,
                                "--model.init_args.init_from", str(ckpt)), "init_from", "shape mismatch")
    # Resuming (--ckpt_path) rebuilds the network from the checkpoint's own hyperparameters (LightningCLI), so
    # a mismatch can only come from code that builds the model itself: the system says so before torch does.
    from dcssdae.system import DCSSDAESystem

    other = DCSSDAESystem(encoder="tiny-f32c8", encoder_overrides={"latent_channels": 16}, decoder="tiny",
                          loss_weights={"eqm": 1.0, "lpips": 0.0, "repa": 0.0, "kl": 0.0}, val_rfid=False,
                          val_lpips=None)
    with pytest.raises(ValueError, match="holds another network .* use --model.init_args.init_from"):
        other.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    Path("runs/junk.ckpt").write_bytes(b"junk")
    fails_with(capsys, fit_args("other", "--ckpt_path", "runs/junk.ckpt"), "junk.ckpt cannot be read")
    evil = torch.load(ckpt, weights_only=True)
    evil["hyper_parameters"]["payload"] = Payload(Path("pwned"))
    torch.save(evil, "runs/evil.ckpt")
    fails_with(capsys, fit_args("other", "--ckpt_path", "runs/evil.ckpt"), "evil.ckpt holds Python objects")
    assert not Path("pwned").exists()


class Payload:
    """Unpickling this creates the file `marker`: stands for arbitrary code run by pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker.resolve(),))


def test_numerical_blow_up_stops_naming_the_terms_and_step(fit_args, capsys):
    # lr 1e30: the first step sends the weights far out, every later loss is NaN. Each such step is skipped; the
    # third in a row stops the run. The weights in the checkpoint stay finite.
    err = fails_with(capsys, fit_args("blowup", "--model.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0",
                                      "--model.init_args.loss_weights", "{eqm: 1.0, stlpips: 0.5, kl: 1.0e-6}",
                                      "--trainer.max_steps", "20", "--guard.max_consecutive", "3"),
                     "training stopped at step 3", "3 steps in a row had non-finite loss term(s) eqm=nan")
    assert "stlpips=nan" in err
    checkpoint = torch.load("runs/blowup/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# Logged skips: training goes on.


def write_train_shards(root: Path, sizes: list[tuple[int, int]], shard_size: int) -> str:
    items = [Item(f"img{i:03d}", -1, f"mem{i}", jpeg(w, h, i)) for i, (w, h) in enumerate(sizes)]
    return str(root / write_shards(items, root, "train", shard_size, progress=False)["pattern"])


def test_small_and_corrupt_images_and_a_shard_that_vanishes(fit_args, caplog, tmp_path):
    # Shard 0: images smaller than the 64 px crop (upscaled); shard 1: normal; shard 2: a corrupt JPEG among
    # good ones (written by hand: `dcssdae shards` would have refused it). Shard 1 is deleted mid-run.
    pattern = write_train_shards(tmp_path, [(8, 8), (20, 12), (40, 30), (64, 64), (90, 70), (80, 100)], 3)
    corrupt = tmp_path / "train-000002.tar"
    with tarfile.open(corrupt, "w") as tar:
        for key, data in (("bad", jpeg(80, 80, 1)[:200]), ("good", jpeg(80, 80, 2))):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    urls = pattern.replace("000001}", "000002}")

    class DeleteShard(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                (tmp_path / "train-000001.tar").unlink()

    cli = run_lightning_cli(fit_args("skips", "--data.train_shards", urls, "--data.train_epoch_size", "40",
                                     "--trainer.max_steps", "12")[1:], run=False)
    cli.trainer.callbacks.append(DeleteShard())
    with caplog.at_level(logging.WARNING, logger="dcssdae.data"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12
    assert "skipped unreadable shard data" in caplog.text and "train-000001.tar" in caplog.text
    assert "skipped sample bad of" in caplog.text and cli.datamodule.skipped_samples["train"] > 0
    assert torch.isfinite(torch.cat([p.flatten() for p in cli.model.parameters()])).all()
