"""Before a run builds anything, `dcssdae fit / validate` checks what it needs (dcssdae.preflight) and names every
missing piece at once, one line each with its fix: on a machine without a GPU, ImageNet shards, the previous phase's
checkpoint or the pretrained loss networks (a fresh clone), the shipped GPU recipes fail in one screen."""

import subprocess
from pathlib import Path

import pytest
import torch

from dcssdae.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A working directory with no shards, no runs and empty weight caches, on a machine declared offline; building
    a system is an error (the check must come first)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    from dcssdae.autoencoder import DCSSDAE

    def built(*args, **kwargs):
        raise AssertionError("a network was built before the pre-flight check")

    monkeypatch.setattr(DCSSDAE, "__init__", built)
    return tmp_path


def problems(capsys, argv: list[str]) -> list[str]:
    """Run `dcssdae ARGV`; it must stop with the pre-flight report: its problem lines."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    head, *lines = err.strip().splitlines()
    assert head.startswith("dcssdae fit: cannot start, ") and "nothing was built or written" in head, err
    assert all(line.startswith("  - ") for line in lines), err
    assert head.split(", ")[1].startswith(f"{len(lines)} problem"), err
    return [line[4:] for line in lines]


def test_phase1_on_a_fresh_cpu_machine_names_every_missing_piece_at_once(fresh, capsys):
    found = problems(capsys, ["fit", "--config", str(ROOT / "configs" / "phase1.yaml")])
    text = "\n".join(found)
    if not torch.cuda.is_available():
        (gpu,) = [p for p in found if p.startswith("trainer.accelerator is 'gpu'")]
        # the fix: the CPU recipe's counterpart of this phase, or the overrides
        assert "quickstart.yaml" in gpu and "--trainer.accelerator cpu --trainer.devices 1" in gpu
    assert "data.train_shards 'data/imagenet/train/train-{000000..001281}.tar': all 1282 shard" in text
    assert "data.val_shards 'data/imagenet/val/val-{000000..000049}.tar': all 50 shard" in text
    assert "dcssdae shards SRC OUT" in text and "--data.train_shards default" in text
    (lpips,) = [p for p in found if p.startswith("the LPIPS loss")]
    assert "vgg16-397923af.pth" in lpips and str(fresh / "torch") in lpips and "--model.lpips_variant stlpips" in lpips
    (repa,) = [p for p in found if p.startswith("REPA")]
    assert "timm/vit_base_patch14_dinov2" in repa and "--model.loss_weights.repa 0" in repa
    (metric,) = [p for p in found if p.startswith("the validation metric LPIPS")]
    assert "alexnet-owt-7be5be79.pth" in metric and "--model.val_lpips stlpips_alex" in metric
    assert len(found) == 5 + (not torch.cuda.is_available())


def test_distill_names_the_missing_teacher_and_suggests_the_cpu_recipe(fresh, capsys):
    found = problems(capsys, ["fit", "--config", str(ROOT / "configs" / "distill.yaml"), "--model.init_from",
                              "runs/phase3/checkpoints/last.ckpt"])
    (teacher,) = [p for p in found if p.startswith("model.init_from")]
    assert "'runs/phase3/checkpoints/last.ckpt' does not exist" in teacher and "PHASE3_CKPT" in teacher
    if not torch.cuda.is_available():
        assert any("configs/cpu/distill.yaml" in p for p in found), found


def test_the_suggested_overrides_clear_every_problem(fresh, capsys, monkeypatch):
    """Following the report's fixes on the phase-1 config leaves nothing to report (the run then starts, here
    up to the autoencoder's construction)."""
    from dcssdae.autoencoder import DCSSDAE

    def start(*args, **kwargs):
        raise ValueError("the autoencoder is being built")

    monkeypatch.setattr(DCSSDAE, "__init__", start)
    code = main(["fit", "--config", str(ROOT / "configs" / "phase1.yaml"), "--trainer.accelerator", "cpu",
                 "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
                 "--data.train_shards", "default", "--data.val_shards", "default", "--model.lpips_variant", "stlpips",
                 "--model.loss_weights.repa", "0", "--model.val_lpips", "stlpips_alex"])
    err = capsys.readouterr().err
    assert code == 1 and "the autoencoder is being built" in err and "cannot start" not in err, err


def test_missing_checkpoint_and_shards_of_validate_are_reported_together(fresh, capsys):
    argv = ["validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--ckpt_path", "runs/none.ckpt",
            "--data.val_shards", "val/val-{000..003}.tar"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dcssdae validate: cannot start, 2 problems"), err
    assert "--ckpt_path 'runs/none.ckpt' does not exist" in err and "all 4 shard file(s) are missing" in err


def test_downloadable_weights_are_a_note_when_online(fresh, capsys, monkeypatch):
    """Not offline: a weights file missing from the cache is downloaded when the network is built; the check says
    so and lets the run go on."""
    from dcssdae.preflight import check_loss_networks

    monkeypatch.delenv("HF_HUB_OFFLINE")
    found, notes = check_loss_networks({"loss_weights": {"lpips": 0.5, "repa": 0.0}, "lpips_variant": "lpips",
                                        "lpips_net": "vgg"})
    assert found == [] and len(notes) == 1 and "will be downloaded from https://download.pytorch.org" in notes[0]


def test_make_distill_takes_overrides_and_the_cpu_recipe_distillation_is_one_target(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "dcssdae").touch()  # an environment exists: nothing to install
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())

    def dry_run(*args: str) -> list[str]:
        result = subprocess.run(["make", "-n", *args], cwd=tmp_path, capture_output=True, text=True, check=True)
        return [line for line in result.stdout.splitlines() if "dcssdae.cli" in line]

    (line,) = dry_run("distill", "ARGS=--trainer.max_steps 5 --trainer.devices 2", "PHASE3_CKPT=p3.ckpt")
    assert line.endswith("fit --config configs/distill.yaml --model.init_from p3.ckpt --trainer.max_steps 5 "
                         "--trainer.devices 2"), line
    (line,) = dry_run("cpu-distill", "ARGS=--trainer.max_steps 3")
    assert "fit --config configs/cpu/distill.yaml --trainer.default_root_dir runs/cpu/distill --model.init_from " \
           "runs/cpu/phase3/checkpoints/last.ckpt --trainer.max_steps 3" in line, line
    # the whole CPU recipe runs the same distillation command
    assert any("configs/cpu/distill.yaml" in line for line in dry_run("cpu-recipe"))
