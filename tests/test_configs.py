"""Every shipped config parses and instantiates through the `dcssdae` CLI; experiment configs train the objective
their name says; the phase chain points at the previous phase's checkpoint; config includes compose."""

import contextlib
import io
import itertools
from pathlib import Path

import pytest
import yaml

from dcssdae.cli import expand_config_includes, main, run_lightning_cli
from dcssdae.distill import DistillSystem
from dcssdae.objectives import EquilibriumMatching, FlowMatching
from dcssdae.system import DCSSDAESystem

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = ROOT / "tests" / "configs" / "cpu_tiny.yaml"
# What a CPU test machine cannot have: GPUs, and the LPIPS / DINOv2 / Inception weights (downloads).
CPU_OFFLINE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
               "--trainer.precision", "32-true", "--model.lpips_variant", "stlpips", "--model.repa_pretrained", "false",
               "--model.val_rfid", "false", "--model.val_lpips", "null"]


def instantiate(config: Path, *extra: str):
    return run_lightning_cli(["--config", str(config), *extra], run=False)


def resolved(config: Path) -> dict:
    """The run a file stands for, includes applied, as `dcssdae fit --print_config` shows it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(out.getvalue())


def test_shipped_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"quickstart.yaml", "phase1.yaml", "phase2.yaml", "phase3.yaml", "distill.yaml",
            "experiments/vq_f8c4_fm.yaml", "experiments/dc_f32c32_fm.yaml", "experiments/dc_f32c32_eqm.yaml"} <= names


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_instantiates_on_tiny_networks(config):
    cli = instantiate(config, "--config", str(TINY))
    raw = yaml.safe_load(config.read_text())
    expected = DistillSystem if "Distill" in str(raw.get("model", {}).get("class_path", "")) else DCSSDAESystem
    assert type(cli.model) is expected
    assert cli.trainer.max_steps == 2 and cli.datamodule.image_size == 64


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_instantiates_its_real_networks(config):
    cli = instantiate(config, *CPU_OFFLINE)
    parsed = cli.config["model"]["init_args"]
    assert cli.model.ae.encoder.name == parsed["encoder"]
    assert sum(p.numel() for p in cli.model.ae.parameters()) > 1e6 or "quickstart" in config.name


@pytest.mark.parametrize("name", ["vq_f8c4_fm", "dc_f32c32_fm", "dc_f32c32_eqm"])
def test_experiment_trains_the_objective_its_name_says(name):
    """The public DC_SSDAE 'EqM' config trained flow matching; ours must not."""
    cli = instantiate(ROOT / "configs" / "experiments" / f"{name}.yaml", "--config", str(TINY))
    corruption, decoder = cli.model.ae.corruption, cli.model.ae.decoder
    if name.endswith("_eqm"):
        assert isinstance(corruption, EquilibriumMatching) and not decoder.time_conditioned
        assert cli.model.ae.sampler["method"] in ("gd", "nesterov", "adaptive", "one_step")
    else:
        assert isinstance(corruption, FlowMatching) and decoder.time_conditioned
        assert cli.model.ae.sampler["method"] == "euler"
    raw = yaml.safe_load((ROOT / "configs" / "experiments" / f"{name}.yaml").read_text())
    expected_encoder = "vq_f8c4" if name.startswith("vq") else "dc-ae-1.5-f32c32"
    assert raw["model"]["init_args"]["encoder"] == expected_encoder


def test_each_phase_starts_from_the_previous_phases_checkpoint():
    chain = ["phase1", "phase2", "phase3", "distill"]
    configs = {name: resolved(ROOT / "configs" / f"{name}.yaml") for name in chain}
    for previous, current in itertools.pairwise(chain):
        # no config pins checkpoint.dirpath: a run's checkpoints are <default_root_dir>/checkpoints (RunCheckpoint)
        assert configs[previous]["checkpoint"]["dirpath"] is None
        expected = f"{configs[previous]['trainer']['default_root_dir']}/checkpoints/last.ckpt"
        assert configs[current]["model"]["init_args"]["init_from"] == expected
    assert configs["phase1"]["model"]["init_args"]["init_from"] is None
    assert configs["phase2"]["data"]["image_size"] == 512 and configs["phase3"]["data"]["image_size"] == 256
    assert configs["phase1"]["trainer"]["strategy"] == "ddp"
    assert configs["phase1"]["model"]["init_args"]["loss_weights"]["repa"] > 0
    assert configs["phase3"]["model"]["init_args"]["loss_weights"]["repa"] == 0


def test_print_config_shows_the_resolved_run():
    out = resolved(ROOT / "configs" / "phase2.yaml")
    assert out["model"]["init_args"]["init_from"] == "runs/phase1/checkpoints/last.ckpt"
    assert out["model"]["init_args"]["encoder"] == "dc-ae-f32c32-in-1.0"  # from base.yaml, through the include
    assert out["trainer"]["precision"] == "bf16-mixed"
    assert out["data"]["train_shards"].startswith("data/imagenet/train/")


def test_help_documents_the_model_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model.trainable", "--model.init_from", "--model.teacher_steps", "--ema.decay",
                 "--data.train_shards", "--checkpoint.dirpath"):
        assert flag in out
    assert "fnmatch patterns over the autoencoder's parameter names" in " ".join(out.split())  # docstring


# ------------------------------------------------------------------------------------------------
# Includes: a file's `config: parent.yaml` is expanded into --config parent --config file.


def test_includes_merge_nested_settings_and_keep_class_paths(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "model:\n  class_path: dcssdae.system.DCSSDAESystem\n  init_args:\n    lr: 0.5\n    warmup_steps: 7\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("config: ../parent.yaml\nmodel:\n  init_args:\n    lr: 0.25\n")
    args = expand_config_includes(["fit", "--config", str(tmp_path / "sub" / "child.yaml"), "--x", "1"])
    assert args[:3] == ["fit", "--config", str(tmp_path / "sub" / "../parent.yaml")]
    assert args[-2:] == ["--x", "1"] and "config:" not in args[4]
    cli = instantiate(tmp_path / "sub" / "child.yaml", "--config", str(TINY))
    assert cli.model.lr == 0.25 and cli.model.warmup_steps == 7  # merged, not replaced


def test_include_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        expand_config_includes(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("config: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        expand_config_includes(["--config", str(tmp_path / "c.yaml")])


def test_phase1_on_24gb_cards_keeps_192_images_per_optimiser_step():
    small, full = resolved(ROOT / "configs" / "phase1_24gb.yaml"), resolved(ROOT / "configs" / "phase1.yaml")
    images = small["data"]["batch_size"] * small["trainer"]["accumulate_grad_batches"] * 8  # 8 GPUs
    assert images == full["data"]["batch_size"] * 8 == 192 and small["data"]["batch_size"] == 8
    # validation every 5000 optimiser steps (val_check_interval counts micro-batches); same run folder as phase 1
    assert small["trainer"]["val_check_interval"] == 3 * full["trainer"]["val_check_interval"]
    assert small["trainer"]["default_root_dir"] == "runs/phase1"
