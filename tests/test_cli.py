"""The `dcssdae` command end to end on CPU, with the shipped configs plus the tiny test overlay:
quick-start fit -> checkpoint -> validate (metrics JSON); phase 1 -> 2 -> 3 -> distill, each from the previous
checkpoint; loading a checkpoint in a new process; a 2-process DDP fit (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcssdae.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = ROOT / "tests" / "configs" / "cpu_tiny.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory (runs/ go there) and the default photo shards, built once for this module."""
    work = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCSSDAE_DATA", str(work / "data"))
        mp.chdir(work)
        from dcssdae.photos import ensure_default_photos

        ensure_default_photos()
        yield work


def fit(config: Path, name: str, *extra: str) -> Path:
    """`dcssdae fit --config CONFIG --config cpu_tiny.yaml` into runs/NAME; returns its last.ckpt."""
    main(["fit", "--config", str(config), "--config", str(TINY), "--trainer.default_root_dir", f"runs/{name}",
          "--checkpoint.dirpath", f"runs/{name}/checkpoints", *extra])
    ckpt = Path(f"runs/{name}/checkpoints/last.ckpt")
    assert ckpt.is_file()
    return ckpt.resolve()


def ae_state(ckpt: Path, key: str = "state_dict", prefix: str = "ae.") -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)[key]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def quickstart_ckpt(workdir):
    return fit(CONFIGS / "quickstart.yaml", "quickstart")


def test_quickstart_fit_writes_checkpoint_and_reconstructions_then_validate_reports_metrics(quickstart_ckpt):
    logs = sorted(Path("runs/quickstart/lightning_logs").glob("version_*"))
    assert (logs[-1] / "reconstructions" / "latest.png").is_file()
    assert (logs[-1] / "config.yaml").is_file()  # the resolved run, saved by LightningCLI
    main(["validate", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(TINY),
          "--trainer.default_root_dir", "runs/quickstart_val", "--ckpt_path", str(quickstart_ckpt)])
    (report,) = Path("runs/quickstart_val").rglob("validate_metrics.json")
    metrics = json.loads(report.read_text())
    assert metrics["num_images"] == 4 and metrics["nfe"] == 1.0  # 2 batches of 2, the one-step sampler of the overlay
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1


def test_ckpt_path_resumes_the_full_state(quickstart_ckpt):
    start = torch.load(quickstart_ckpt, weights_only=True)
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(TINY), "--trainer.max_steps", "4",
          "--trainer.default_root_dir", "runs/resumed", "--checkpoint.dirpath", "runs/resumed/checkpoints",
          "--ckpt_path", str(quickstart_ckpt)])
    end = torch.load("runs/resumed/checkpoints/last.ckpt", weights_only=True)
    assert start["global_step"] == 2 and end["global_step"] == 4
    assert end["callbacks"]["EMA"]["num_updates"] == start["callbacks"]["EMA"]["num_updates"] + 2
    assert end["optimizer_states"][0]["state"][0]["step"] == start["optimizer_states"][0]["state"][0]["step"] + 2


def test_checkpoint_loads_in_a_new_process(quickstart_ckpt):
    code = (
        "import sys, torch\n"
        "from dcssdae.system import DCSSDAESystem\n"
        "from dcssdae.autoencoder import DCSSDAE\n"
        "ckpt = sys.argv[1]\n"
        "model = DCSSDAESystem.load_from_checkpoint(ckpt)\n"
        "ae = DCSSDAE.from_pretrained(ckpt)\n"
        "state = torch.load(ckpt, weights_only=True)['state_dict']\n"
        "for k, v in model.ae.state_dict().items():\n"
        "    assert torch.equal(v, state['ae.' + k]) and torch.equal(ae.state_dict()[k], v), k\n"
        "x = torch.rand(1, 3, 64, 64) * 2 - 1\n"
        "print('OK', tuple(ae.decode(ae.encode(x), steps=1).shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(quickstart_ckpt)], capture_output=True, text=True,
                            timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (1, 3, 64, 64)" in result.stdout


def test_phase_chain_each_initialised_from_the_previous_checkpoint(workdir):
    phase1 = fit(CONFIGS / "phase1.yaml", "phase1")  # REPA on (random tiny ViT in the overlay)
    phase2 = fit(CONFIGS / "phase2.yaml", "phase2", "--model.init_from", str(phase1))
    phase3 = fit(CONFIGS / "phase3.yaml", "phase3", "--model.init_from", str(phase2))
    distill = fit(CONFIGS / "distill.yaml", "distill", "--model.init_from", str(phase3))

    ema1, live2 = ae_state(phase1), ae_state(phase2, "current_model_state")
    # phase 2 started from phase 1's EMA weights; what it froze is still exactly that
    assert torch.equal(live2["encoder.stages.1.blocks.0.conv1.weight"], ema1["encoder.stages.1.blocks.0.conv1.weight"])
    assert torch.equal(live2["decoder.mid.proj_in.weight"], ema1["decoder.mid.proj_in.weight"])
    assert not torch.equal(live2["encoder.project_out.weight"], ema1["encoder.project_out.weight"])
    # phase 3: the encoder is frozen, the decoder head trains
    ema2, live3 = ae_state(phase2), ae_state(phase3, "current_model_state")
    assert all(torch.equal(live3[k], ema2[k]) for k in ema2 if k.startswith("encoder."))
    assert not torch.equal(live3["decoder.out_conv.weight"], ema2["decoder.out_conv.weight"])
    # distillation: the teacher is phase 3's EMA model, frozen; the student decoder moves
    ema3 = ae_state(phase3)
    teacher = ae_state(distill, "current_model_state", "teacher.")
    student = ae_state(distill, "current_model_state")
    assert all(torch.equal(teacher[k], ema3[k]) for k in ema3)
    assert not torch.equal(student["decoder.out_conv.weight"], ema3["decoder.out_conv.weight"])
    assert all(torch.equal(student[k], ema3[k]) for k in ema3 if k.startswith("encoder."))


def test_ddp_two_processes_on_cpu(workdir):
    command = [sys.executable, "-m", "dcssdae.cli", "fit", "--config", str(CONFIGS / "quickstart.yaml"),
               "--config", str(TINY), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.train_epoch_size", "8",
               "--trainer.default_root_dir", "runs/ddp", "--checkpoint.dirpath", "runs/ddp/checkpoints"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=workdir,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(workdir / "runs/ddp/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and "current_model_state" in checkpoint
