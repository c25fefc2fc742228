"""The `dcssdae` command end to end on CPU, with the shipped configs plus the tiny test overlay:
quick-start fit -> checkpoint -> validate / test (metrics JSON) and predict (reconstruction PNGs); phase 1 -> 2 -> 3
-> distill, each from the previous checkpoint; loading a checkpoint in a new process; a 2-process DDP fit (gloo) in
which every rank draws its own noise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from dcssdae.data import ValShards


def fit(tiny_cli, config: str, name: str, *extra: str) -> Path:
    """`dcssdae fit --config configs/CONFIG --config cpu_tiny.yaml` into runs/NAME; returns its last.ckpt."""
    assert tiny_cli("fit", name, *extra, config=config) == 0
    ckpt = tiny_cli.last_ckpt(name)
    assert ckpt.is_file()
    return ckpt


def ae_state(ckpt: Path, key: str = "state_dict", prefix: str = "ae.") -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)[key]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def quickstart_ckpt(tiny_cli):
    return fit(tiny_cli, "quickstart.yaml", "quickstart")


def test_quickstart_fit_writes_checkpoint_and_reconstructions_then_validate_reports_metrics(tiny_cli, quickstart_ckpt):
    logs = sorted(Path("runs/quickstart/lightning_logs").glob("version_*"))
    assert (logs[-1] / "reconstructions" / "latest.png").is_file()
    assert (logs[-1] / "config.yaml").is_file()  # the resolved run, saved by LightningCLI
    assert tiny_cli("validate", "quickstart_val", "--ckpt_path", str(quickstart_ckpt)) == 0
    (report,) = Path("runs/quickstart_val").rglob("validate_metrics.json")
    metrics = json.loads(report.read_text())
    # every validation image (the overlay's limit_val_batches 2 is for fit's periodic validation), the overlay's
    # one-step sampler; the JSON says which checkpoint, at which step, with which sampler
    assert metrics["num_images"] == 8 and metrics["nfe"] == 1.0  # the 8 dev photos
    assert metrics["checkpoint"] == str(quickstart_ckpt.absolute()) and metrics["checkpoint_global_step"] == 2
    assert metrics["sampler"]["method"] == "one_step"
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    # the bicubic baseline at the latent's budget, scored on the same images, beside the model
    bicubic = metrics["bicubic"]
    assert bicubic["num_images"] == 8 and "nfe" not in bicubic and 10 < bicubic["psnr"] < 60
    # and the one-step decoder (quickstart.yaml's val_extra_steps), from the same latents and noise
    assert metrics["1 step"]["num_images"] == 8 and metrics["1 step"]["nfe"] == 1.0


def test_ckpt_path_keeps_the_evaluation_settings_of_the_command_line(tiny_cli, quickstart_ckpt):
    assert tiny_cli("validate", "eval_settings", "--ckpt_path", str(quickstart_ckpt), "--trainer.limit_val_batches",
                    "2", "--model.init_args.sampler", "{method: nesterov, steps: 8}", "--model.init_args.val_steps",
                    "2") == 0
    (report,) = Path("runs/eval_settings").rglob("validate_metrics.json")
    metrics = json.loads(report.read_text())
    assert metrics["num_images"] == 4  # a limit given on the command line is kept (2 batches of 2)
    assert metrics["nfe"] == 2.0 and metrics["sampler"]["method"] == "nesterov" and metrics["sampler"]["steps"] == 2


def test_a_setting_taken_from_the_checkpoint_leaves_the_other_settings_alone(tiny_cli, quickstart_ckpt):
    """A checkpoint trained with another sampler: validate takes that sampler (left at its default on the command line)
    and keeps every other setting of the config (here the overlay's val_lpips null and val_rfid false, not the
    system's defaults "lpips" and true, whose weights are not on this machine)."""
    checkpoint = torch.load(quickstart_ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["sampler"] = {"method": "one_step"}
    torch.save(checkpoint, ckpt := tiny_cli.work / "runs/quickstart/checkpoints/one_step_sampler.ckpt")
    assert tiny_cli("validate", "taken_sampler", "--ckpt_path", str(ckpt)) == 0
    (report,) = Path("runs/taken_sampler").rglob("validate_metrics.json")
    metrics = json.loads(report.read_text())
    assert metrics["sampler"]["method"] == "one_step" and metrics["nfe"] == 1.0
    assert "lpips" not in metrics and "rfid" not in metrics


def test_ckpt_path_with_another_architecture_is_one_clear_error(tiny_cli, quickstart_ckpt, capsys):
    code = tiny_cli("validate", "conflict", "--ckpt_path", str(quickstart_ckpt),
                    "--model.init_args.decoder_overrides", "{channels: 48}")
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("dcssdae: error:")]
    assert "model.decoder_overrides is {} in the checkpoint but {'channels': 48} was given" in line


def test_two_root_folders_do_not_collide(tiny_cli):
    # No config pins checkpoint.dirpath: each run writes <default_root_dir>/checkpoints/last.ckpt
    assert tiny_cli("fit", "root_a", "--trainer.max_steps", "1") == 0
    assert tiny_cli("fit", "root_b", "--trainer.max_steps", "2") == 0
    a, b = (torch.load(tiny_cli.last_ckpt(n), weights_only=True) for n in ("root_a", "root_b"))
    assert a["global_step"] == 1 and b["global_step"] == 2
    assert not Path("lightning_logs").exists() and not Path("checkpoints").exists()


def test_wandb_logs_config_and_images_in_the_run_folder(tiny_cli):
    from dcssdae.cli import run_lightning_cli

    wandb = json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": True}})
    cli = run_lightning_cli(tiny_cli.args("fit", "wandb_run", "--trainer.logger", wandb)[1:], run=False)
    # trainer.log_dir is where LightningCLI writes config.yaml and ReconstructionGrid its PNGs
    assert Path(cli.trainer.log_dir).resolve() == (tiny_cli.work / "runs/wandb_run").resolve()


def test_ema_updates_once_per_optimiser_step_under_gradient_accumulation(tiny_cli):
    # 6 batches, 3 per optimiser step: 2 optimiser steps, 2 EMA updates (warm-up counted in optimiser steps)
    assert tiny_cli("fit", "accumulate", "--trainer.accumulate_grad_batches", "3", "--trainer.max_steps", "2",
                    "--data.train_epoch_size", "12") == 0
    checkpoint = torch.load(tiny_cli.last_ckpt("accumulate"), weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["callbacks"]["EMA"]["num_updates"] == 2


def test_test_subcommand_reports_metrics_on_the_validation_images(tiny_cli, quickstart_ckpt):
    assert tiny_cli("test", "quickstart_test", "--ckpt_path", str(quickstart_ckpt)) == 0
    (report,) = Path("runs/quickstart_test").rglob("test_metrics.json")
    metrics = json.loads(report.read_text())
    assert metrics["num_images"] == 8 and metrics["nfe"] == 1.0  # every dev photo, once
    assert 0 < metrics["psnr"] < 100


def test_predict_writes_input_and_reconstruction_of_every_validation_image(tiny_cli, quickstart_ckpt):
    # Live weights far from the EMA ones (after 2 warm-up steps they are nearly equal): predict must use the EMA.
    checkpoint = torch.load(quickstart_ckpt, weights_only=True)
    live = checkpoint["current_model_state"]
    for name in [k for k in live if k.startswith("ae.decoder.") and live[k].is_floating_point()]:
        live[name] = live[name] + 0.5 * torch.randn_like(live[name])
    torch.save(checkpoint, ckpt := tiny_cli.work / "runs/quickstart/checkpoints/live_differs.ckpt")
    result = tiny_cli.subprocess("predict", "quickstart_predict", "--ckpt_path", str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tiny_cli.work / "runs/quickstart_predict/lightning_logs").glob("version_*/reconstructions")
    assert f"wrote 8 reconstructions (all; input | reconstruction) to {folder}" in result.stdout

    # The same images, batches and per-batch noise seeds (val_seed + batch index) as the run, and the checkpoint's
    # EMA weights, rebuilt here: each PNG is the 64 px input | its one-step reconstruction, as uint8.
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.metrics import quantize_uint8

    ae = DCSSDAE.from_pretrained(ckpt)
    val = ValShards(str(tiny_cli.work / "data/photos/dev/dev-{000000..000000}.tar"), 64, 2, rank=0, world_size=1)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 8
    for batch_idx, batch in enumerate(val):
        x = batch["image"]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch_idx))
        with torch.no_grad():
            x_hat = ae.decode(ae.encode(x), noise=noise, steps=1).clamp(-1, 1)
        expected = torch.cat([quantize_uint8(x), quantize_uint8(x_hat)], dim=3).permute(0, 2, 3, 1).numpy()
        for key, pair in zip(batch["key"], expected):
            written = np.asarray(Image.open(folder / f"{key}.png"))
            assert written.shape == (64, 128, 3) and written.dtype == np.uint8
            assert np.array_equal(written[:, :64], pair[:, :64]), key  # the input, exactly
            assert np.abs(written[:, 64:].astype(int) - pair[:, 64:]).max() <= 1, key  # its reconstruction


def test_ckpt_path_resumes_the_full_state(tiny_cli, quickstart_ckpt):
    start = torch.load(quickstart_ckpt, weights_only=True)
    assert tiny_cli("fit", "resumed", "--trainer.max_steps", "4", "--ckpt_path", str(quickstart_ckpt)) == 0
    end = torch.load(tiny_cli.last_ckpt("resumed"), weights_only=True)
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


def test_phase_chain_each_initialised_from_the_previous_checkpoint(tiny_cli):
    phase1 = fit(tiny_cli, "phase1.yaml", "phase1")  # REPA on (random tiny ViT in the overlay)
    phase2 = fit(tiny_cli, "phase2.yaml", "phase2", "--model.init_from", str(phase1))
    phase3 = fit(tiny_cli, "phase3.yaml", "phase3", "--model.init_from", str(phase2))
    distill = fit(tiny_cli, "distill.yaml", "distill", "--model.init_from", str(phase3))

    ema1, live2 = ae_state(phase1), ae_state(phase2, "current_model_state")
    # phase 2 started from phase 1's EMA weights; what it froze is still exactly that
    assert torch.equal(live2["encoder.stages.1.blocks.0.conv1.weight"], ema1["encoder.stages.1.blocks.0.conv1.weight"])
    assert torch.equal(live2["decoder.mid.proj_in.weight"], ema1["decoder.mid.proj_in.weight"])
    assert not torch.equal(live2["encoder.project_out.weight"], ema1["encoder.project_out.weight"])
    # phase 3: the encoder is frozen, the decoder head trains
    ema2, live3 = ae_state(phase2), ae_state(phase3, "current_model_state")
    assert all(torch.equal(live3[k], ema2[k]) for k in ema2 if k.startswith("encoder."))
    assert not torch.equal(live3["decoder.out_conv.weight"], ema2["decoder.out_conv.weight"])
    # distillation: the teacher is phase 3's EMA model, frozen; the student decoder moves; its loss terms are
    # distill (the one-step MSE) and the perceptual one, logged under their own names. The checkpoint holds the
    # student (live + EMA) and not the teacher (init_from's model): about the size of phase 3's.
    ema3 = ae_state(phase3)
    assert not ae_state(distill, "current_model_state", "teacher.") and not ae_state(distill, "state_dict", "teacher.")
    def tensor_bytes(ckpt: Path, key: str) -> int:
        return sum(v.numel() * v.element_size() for v in torch.load(ckpt, weights_only=True)[key].values())

    assert tensor_bytes(distill, "state_dict") < 1.05 * tensor_bytes(phase3, "state_dict")  # one model, not two
    student = ae_state(distill, "current_model_state")
    assert not torch.equal(student["decoder.out_conv.weight"], ema3["decoder.out_conv.weight"])
    assert all(torch.equal(student[k], ema3[k]) for k in ema3 if k.startswith("encoder."))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = Path("runs/distill/lightning_logs").rglob("events.out.tfevents.*")
    logged = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/distill", "train/stlpips", "train/loss"} <= logged and "train/eqm" not in logged

    # a resume rebuilds the teacher from init_from and goes on
    assert tiny_cli("fit", "distill", "--model.init_from", str(phase3), "--trainer.max_steps", "3", "--ckpt_path",
                    "last", "--config", json.dumps({"trainer": {"callbacks": [{"class_path": f"{__name__}.TeacherIs",
                    "init_args": {"ckpt": str(phase3)}}]}}), config="distill.yaml") == 0
    assert torch.load(distill, weights_only=True)["global_step"] == 3


class TeacherIs(Callback):
    """Asserts, once training (re)starts, that the distillation teacher holds `ckpt`'s EMA weights."""

    def __init__(self, ckpt: str):
        self.ckpt = ckpt

    def on_train_start(self, trainer, pl_module):
        ema = ae_state(Path(self.ckpt))
        assert all(torch.equal(v, ema[k]) for k, v in pl_module.teacher.state_dict().items())


class RecordNoise(Callback):
    """Writes runs/<run>/noise_rank<R>.json: the sums of the corruption noise and levels of each training step."""

    def on_train_start(self, trainer, pl_module):
        drawn, corrupt = [], pl_module.corruption.corrupt

        def recording(x, noise, level):
            drawn.append([noise.double().sum().item(), level.double().sum().item()])
            return corrupt(x, noise, level)

        pl_module.corruption.corrupt, self.drawn = recording, drawn

    def on_train_end(self, trainer, pl_module):
        path = Path(trainer.default_root_dir) / f"noise_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.drawn))


def test_ddp_two_processes_on_cpu_each_rank_draws_its_own_noise(tiny_cli):
    record = {"trainer": {"callbacks": [{"class_path": "test_cli.RecordNoise"}]}}
    result = tiny_cli.subprocess("fit", "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                 "--data.train_epoch_size", "8", "--config", json.dumps(record),
                                 env={"PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(tiny_cli.last_ckpt("ddp"), weights_only=True)
    assert checkpoint["global_step"] == 2 and "current_model_state" in checkpoint
    rank0, rank1 = (json.loads((tiny_cli.work / f"runs/ddp/noise_rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) == 2
    for (noise0, level0), (noise1, level1) in zip(rank0, rank1):
        assert noise0 != noise1 and level0 != level1
