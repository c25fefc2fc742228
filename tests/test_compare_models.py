"""benchmarks/compare_models.py: model specs (steps and sampler settings), and one run on the held-out photos that
scores every model and the bicubic baseline and writes the table, the JSON and the picture. Tiny presets."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_models", ROOT / "benchmarks" / "compare_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_model_spec_reads_steps_and_sampler_settings(compare):
    assert compare.parse_model("phase 1=runs/a.ckpt") == ("phase 1", "runs/a.ckpt", None, {})
    assert compare.parse_model("one step = out/x@1") == ("one step", "out/x", 1, {})
    assert compare.parse_model("t=a@b.ckpt@8,power=3,schedule=noise") == (
        "t", "a@b.ckpt", 8, {"power": 3, "schedule": "noise"})
    for bad in ("no-label", "t=a.ckpt@eight", "t=a.ckpt@8,power", "t=a.ckpt@8,power=", "t=a.ckpt@8,=3",
                "t=a.ckpt@8,power=[1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--model"):
            compare.parse_model(bad)


def test_scores_models_with_their_settings_beside_bicubic(compare, tiny_cli, tmp_path):
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.export import write_export

    torch.manual_seed(0)
    model = DCSSDAE(encoder="tiny-f8c4", decoder="tiny")
    torch.nn.init.normal_(model.decoder.out_conv.weight, std=0.1)  # zero at init: the output would ignore the noise
    folder = write_export(model, tmp_path / "model")
    out = tmp_path / "cmp"
    rc = compare.main(["--model", f"two steps={folder}@2", "--model", f"power 3={folder}@2,power=3",
                       "--model", f"one step={folder}@1", "--size", "64", "--batch", "3", "--limit", "3",
                       "--no-rfid", "--picture-size", "32", "--out", str(out)])
    assert rc == 0
    models = json.loads(out.with_suffix(".json").read_text())["models"]
    assert list(models) == ["two steps", "power 3", "one step", "bicubic"]
    assert [models[k]["nfe"] for k in ("two steps", "power 3", "one step")] == [2, 2, 1]
    assert models["power 3"]["sampler_settings"] == {"power": 3}
    assert all(models[k]["num_images"] == 3 for k in models)
    # A different noise schedule gives a different image from the same noise: the setting reached the sampler.
    assert models["power 3"]["psnr"] != pytest.approx(models["two steps"]["psnr"], abs=1e-6)
    assert "| bicubic |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").is_file()
