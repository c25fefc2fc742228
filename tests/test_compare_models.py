"""benchmarks/compare_models.py: model specs (steps and sampler settings), and one run on the dev photos that
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


def test_low_pass_swap_keeps_the_detail_and_takes_the_inputs_low_frequencies(compare):
    """A constant offset is all low frequency: the swap removes it exactly; the input itself is left unchanged, and
    the detail a decode adds above the budget's frequencies is kept."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    torch.testing.assert_close(compare.swap_low_pass(x + 0.1, x, 4, 8), x)
    torch.testing.assert_close(compare.swap_low_pass(x, x, 4, 8), x)
    checker = 0.1 * (torch.arange(64)[:, None] + torch.arange(64)).remainder(2).mul(2).sub(1).float()
    y = compare.swap_low_pass(torch.zeros_like(x) + checker, x, 4, 8)  # pixel-scale detail on no content
    torch.testing.assert_close(y - compare.bicubic_resample(x, 4, 8), checker.expand_as(y), atol=0.02, rtol=0)


def test_scores_models_with_their_settings_beside_bicubic(compare, tiny_cli, tmp_path):
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.export import write_export

    torch.manual_seed(0)
    model = DCSSDAE(encoder="tiny-f8c4", decoder="tiny")
    torch.nn.init.normal_(model.decoder.out_conv.weight, std=0.1)  # zero at init: the output would ignore the noise
    folder = write_export(model, tmp_path / "model")
    out = tmp_path / "cmp"
    rc = compare.main(["--model", f"two steps={folder}@2", "--model", f"power 3={folder}@2,power=3",
                       "--model", f"one step={folder}@1", "--model", f"tiled={folder}@2,tile=32,overlap=16",
                       "--size", "64", "--batch", "3", "--limit", "3",
                       "--no-rfid", "--picture-size", "32", "--low-pass-oracle", "--out", str(out)])
    assert rc == 0
    models = json.loads(out.with_suffix(".json").read_text())["models"]
    oracles = [f"{k} + input low-pass" for k in ("two steps", "power 3", "one step", "tiled")]
    assert list(models) == ["two steps", "power 3", "one step", "tiled", *oracles, "bicubic"]
    assert models[oracles[0]]["oracle_of"] == "two steps" and models[oracles[0]]["nfe"] == 2
    assert models[oracles[0]]["psnr"] > models["two steps"]["psnr"] + 3  # a random decoder: its low-pass is wrong
    assert [models[k]["nfe"] for k in ("two steps", "power 3", "one step", "tiled")] == [2, 2, 1, 2]
    assert models["power 3"]["sampler_settings"] == {"power": 3}
    # tile / overlap switch on tiled evaluation (DCSSDAE.enable_tiling) instead of reaching the sampler; tiles see
    # only their own pixels (the decoder's attention and the encoder's), so the image changes a little
    assert models["tiled"]["sampler_settings"] == {} and models["tiled"]["tiling"] == {"tile": 32, "overlap": 16}
    assert models["two steps"]["tiling"] is None
    assert models["tiled"]["psnr"] != pytest.approx(models["two steps"]["psnr"], abs=1e-6)
    assert models["tiled"]["psnr"] == pytest.approx(models["two steps"]["psnr"], abs=1.0)
    assert all(models[k]["num_images"] == 3 for k in models)
    # A different noise schedule gives a different image from the same noise: the setting reached the sampler.
    assert models["power 3"]["psnr"] != pytest.approx(models["two steps"]["psnr"], abs=1e-6)
    assert "| bicubic |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").is_file()


def test_draws_average_the_metrics_and_measure_the_spread(compare, tiny_cli, tmp_path):
    """--draws 3: each latent decoded from 3 noise draws; metrics are the means, rFID per draw is kept, and the
    spread is the per-pixel std over the draws: 0 for a decoder whose output ignores the noise (the out conv is zero at
    init), > 0 once it does not. Draw 0 is the single-draw run's decode."""
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.export import write_export

    torch.manual_seed(0)
    flat = write_export(DCSSDAE(encoder="tiny-f8c4", decoder="tiny"), tmp_path / "flat")
    model = DCSSDAE(encoder="tiny-f8c4", decoder="tiny")
    torch.nn.init.normal_(model.decoder.out_conv.weight, std=0.1)
    noisy = write_export(model, tmp_path / "noisy")
    common = ["--size", "64", "--batch", "3", "--limit", "3", "--picture-size", "32"]
    out, single = tmp_path / "draws", tmp_path / "single"
    assert compare.main(["--model", f"flat={flat}@2", "--model", f"noisy={noisy}@2", "--draws", "3",
                         *common, "--out", str(out)]) == 0
    assert compare.main(["--model", f"noisy={noisy}@2", "--no-rfid", *common, "--out", str(single)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    models = data["models"]
    assert data["draws"] == 3 and models["noisy"]["num_images"] == 3
    assert models["flat"]["spread"] == pytest.approx(0.0, abs=1e-6)
    assert models["noisy"]["spread"] > 1e-3
    assert len(models["noisy"]["rfid_draws"]) == 3
    assert models["noisy"]["rfid"] == pytest.approx(sum(models["noisy"]["rfid_draws"]) / 3)
    assert "spread" not in models["bicubic"] and "rfid_draws" not in models["bicubic"]
    first = json.loads(single.with_suffix(".json").read_text())["models"]["noisy"]
    assert models["noisy"]["psnr"] != pytest.approx(first["psnr"], abs=1e-6)  # a mean over draws, not draw 0
    table = out.with_suffix(".md").read_text()
    assert "| rFID per draw | spread over draws |" in table
    with pytest.raises(SystemExit):
        compare.main(["--model", f"flat={flat}", "--draws", "0", *common, "--out", str(out)])


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/denoiser_levels.py: the one-step estimate at fixed noise levels.


@pytest.fixture(scope="module")
def levels_script():
    spec = importlib.util.spec_from_file_location("denoiser_levels", ROOT / "benchmarks" / "denoiser_levels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_denoiser_levels_of_a_fresh_gated_model_in_closed_form(levels_script):
    """A zero-initialised gated decoder: D~ = 0 and s = sigmoid(GATE_BIAS) everywhere, so x0_hat = s x_gamma."""
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.objectives import GATE_BIAS, EquilibriumMatching

    torch.manual_seed(0)
    ae = DCSSDAE("tiny-f8c4", "tiny", corruption=EquilibriumMatching(parameterization="gated")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(x)
    s = torch.sigmoid(torch.tensor(GATE_BIAS)).item()
    with torch.no_grad():
        rows = levels_script.levels(ae, x, noise, (0.0, 0.5, 0.9))
    for row in rows:
        x_t = row["gamma"] * x + (1 - row["gamma"]) * noise
        assert row["mse_input"] == pytest.approx((x_t - x).square().mean().item(), rel=1e-5)
        assert row["mse_x0_hat"] == pytest.approx((s * x_t - x).square().mean().item(), rel=1e-4)
        assert row["gate_mean"] == pytest.approx(s, rel=1e-5) and row["gate_p90"] == pytest.approx(s, rel=1e-5)
    assert "gate mean" in levels_script.markdown(rows)


def test_denoiser_levels_on_the_held_out_photos_writes_json(levels_script, tiny_cli, tmp_path):
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.export import write_export

    torch.manual_seed(0)
    folder = write_export(DCSSDAE("tiny-f8c4", "tiny"), tmp_path / "model")
    out = tmp_path / "levels"
    assert levels_script.main([str(folder), "--size", "64", "--limit", "2", "--gammas", "0", "0.9",
                               "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["images"] == 2 and [r["gamma"] for r in result["levels"]] == [0.0, 0.9]
    assert "gate_mean" not in result["levels"][0]  # a denoiser has no gate
    assert [(r["steps"], r["draws"]) for r in result["spread"]] == [(1, 4), (4, 4), (16, 4)]  # the defaults
    assert all(r["spread"] >= 0 and r["mse_mean_of_draws"] <= r["mse_one_draw"] + 1e-6 for r in result["spread"])
    with pytest.raises(SystemExit):
        levels_script.main([str(folder), "--gammas", "1.0"])
    with pytest.raises(SystemExit):
        levels_script.main([str(folder), "--draws", "1"])


def test_sample_spread_in_closed_form(levels_script, monkeypatch):
    """A decoder that ignores its noise has spread 0; one that returns x + 0.1 noise has a pixel std of 0.1 in [-1, 1]
    units, 0.05 in [0, 1] units (within the small-sample bias of 8 draws), and the mean of its draws is closer to x."""
    from dcssdae.autoencoder import DCSSDAE

    ae = DCSSDAE("tiny-f8c4", "tiny").eval()
    x = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    monkeypatch.setattr(ae, "decode", lambda z, noise, **settings: torch.zeros_like(noise) + x.mean())
    row = levels_script.spread(ae, x, steps=4, draws=3)
    assert row["spread"] == 0 and row["mse_one_draw"] == pytest.approx(row["mse_mean_of_draws"])
    monkeypatch.setattr(ae, "decode", lambda z, noise, **settings: x + 0.1 * noise)
    row = levels_script.spread(ae, x, steps=16, draws=8)
    assert row["spread"] == pytest.approx(0.05, rel=0.06)
    assert row["mse_one_draw"] == pytest.approx(0.01, rel=0.1) and row["mse_mean_of_draws"] < 0.3 * row["mse_one_draw"]
    with pytest.raises(ValueError, match="at least 2 draws"):
        levels_script.spread(ae, x, steps=4, draws=1)
