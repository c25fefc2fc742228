"""Using a run's checkpoint: `DCSSDAESystem.load_from_checkpoint` gives the weights that validation and export use
(the EMA), in eval mode, and decodes as the export does; `weights="live"` gives the training weights. A run resumed
with `--ckpt_path` goes on in its own log folder, and its progress bar shows the step and the step total."""

import re
from pathlib import Path

import pytest
import torch

from dcssdae.export import export_checkpoint, load_model
from dcssdae.system import DCSSDAESystem


@pytest.fixture(scope="module")
def run_ckpt(tiny_cli) -> Path:
    """2 steps of the tiny quick-start with an EMA that lags the weights (decay 0.5 from the first step)."""
    assert tiny_cli("fit", "run", "--ema.decay", "0.5", "--trainer.limit_val_batches", "0") == 0
    return tiny_cli.last_ckpt("run")


def test_load_from_checkpoint_gives_the_ema_weights_in_eval_mode_decoding_as_the_export(run_ckpt, tmp_path):
    checkpoint = torch.load(run_ckpt, weights_only=True)
    ema = {k[3:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ae.")}
    live = {k[3:]: v for k, v in checkpoint["current_model_state"].items() if k.startswith("ae.")}
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # the two differ: the test can tell them apart

    model = DCSSDAESystem.load_from_checkpoint(run_ckpt)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, ema[k]) for k, v in model.ae.state_dict().items())
    exported = load_model(export_checkpoint(run_ckpt, tmp_path / "export"))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert model.ae.sampler_settings() == exported.sampler_settings()  # the same sampler: 16 descent steps
    with torch.no_grad():
        z = model.ae.encode(x)
        assert torch.equal(z, exported.encode(x))
        decoded = exported.decode(z, noise=noise, steps=2)  # 2 of the sampler's steps (the test's time)
        assert torch.equal(model.ae.decode(z, noise=noise, steps=2), decoded)

        trained = DCSSDAESystem.load_from_checkpoint(run_ckpt, weights="live")
        assert not trained.training and all(torch.equal(v, live[k]) for k, v in trained.ae.state_dict().items())
        assert not torch.equal(trained.ae.decode(z, noise=noise, steps=2), decoded)  # what the default avoids
    with pytest.raises(ValueError, match="weights must be 'ema'"):
        DCSSDAESystem.load_from_checkpoint(run_ckpt, weights="average")


def test_a_resumed_run_logs_into_its_own_folder_and_shows_the_step_total(tiny_cli, run_ckpt, capsys):
    capsys.readouterr()
    logs = Path("runs/run/lightning_logs")
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    assert tiny_cli("fit", "run", "--ema.decay", "0.5", "--trainer.max_steps", "3", "--ckpt_path", "last",
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "true") == 0
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # not a new version_1
    assert len(list((logs / "version_0").glob("events.out.tfevents.*"))) == 2  # both runs' TensorBoard files
    bar = "".join(capsys.readouterr())  # Lightning's bar writes to stdout
    assert re.search(r"step=3/3", bar), bar[-2000:]
    # another root folder: a new run there, the checkpoint's folder is not borrowed
    assert tiny_cli("fit", "elsewhere", "--ckpt_path", str(run_ckpt), "--trainer.max_steps", "3",
                    "--trainer.limit_val_batches", "0") == 0
    assert [p.name for p in Path("runs/elsewhere/lightning_logs").iterdir()] == ["version_0"]
    assert [p.name for p in logs.iterdir()] == ["version_0"]
