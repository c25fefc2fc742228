"""benchmarks/bench_networks.py: every part (encode, N-step decode, training step) produces its rows, ratios against
the references, the JSON file, and the torch.compile fallback. Tiny presets; no timing is asserted."""

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_networks", ROOT / "benchmarks" / "bench_networks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TINY = ["--device", "cpu", "--encoder", "tiny-f32c8", "--decoder", "tiny", "--sizes", "64", "--batch", "1",
        "--iters", "1", "--warmup", "0"]  # fmt: skip


def _keys(rows):
    return {(r["side"], r["part"], r["nfe"], r["key"]) for r in rows}


def test_every_part_and_model_gets_a_row_written_as_json(bench, tmp_path):
    path = tmp_path / "out" / "bench.json"
    result = bench.main([*TINY, "--references", "tiny", "--steps", "2", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed, not left behind
    rows = saved["rows"]
    models = ("ours", "dc-ae", "sd-vae")
    expected = {(64, "encoder", None, k) for k in models} | {(64, "train", None, k) for k in models}
    expected |= {(64, "decoder", n, "ours") for n in (1, 2)} | {(64, "decoder", None, k) for k in models[1:]}
    expected |= {(64, "enc+dec", n, "ours") for n in (1, 2)} | {(64, "enc+dec", None, k) for k in models[1:]}
    assert _keys(rows) == expected
    for r in rows:
        assert r["error"] is None and r["speed"] > 0 and r["mem"] >= 0 and r["params_m"] > 0, r
        assert r["speed_x_dc_ae"] > 0 and r["speed_x_sd_vae"] > 0, r
        assert r["flops"] > 0, r  # counted (per image)
        if r["key"] == "dc-ae":
            assert r["speed_x_dc_ae"] == 1.0
        if r["part"] == "train":
            assert math.isfinite(r["loss"]) and r["loss"] > 0
    ours = {(r["part"], r["nfe"]): r for r in rows if r["key"] == "ours"}
    # the training step runs encoder and decoder; the decoder rows only the decoder
    assert ours["train", None]["params_m"] == pytest.approx(
        ours["encoder", None]["params_m"] + ours["decoder", 1]["params_m"]
    )
    assert saved["settings"]["steps"] == [1, 2] and saved["settings"]["references"] == "tiny"


def test_parts_select_rows_and_no_reference_leaves_ratios_empty(bench):
    rows = bench.main([*TINY, "--references", "none", "--parts", "train", "decoder", "--steps", "3"])["rows"]
    assert _keys(rows) == {(64, "train", None, "ours"), (64, "decoder", 3, "ours")}
    assert all(r["speed_x_dc_ae"] is None and r["mem_x_sd_vae"] is None for r in rows)


def test_the_training_step_trains_encoder_and_decoder(bench):
    model = bench.Ours("tiny-f32c8", "tiny", "sdpa")
    model.net.train()
    optimizer = bench.make_optimizer(model)
    before = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    loss = bench.train_call(model, optimizer, torch.rand(2, 3, 64, 64) * 2 - 1, contextlib.nullcontext)()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.net.parameters())  # freed after the step
    changed = {name for name, p in model.net.named_parameters() if not torch.equal(before[name], p)}
    # the whole encoder learns (EqM loss through the posterior sample, and KL); in the decoder, the zero-initialised
    # output layer gets the first gradient (the layers behind it only once it is non-zero)
    assert {name for name in before if name.startswith("encoder.")} <= changed
    assert {"decoder.out_conv.weight", "decoder.out_conv.bias"} <= changed


def test_decoder_rows_run_the_eqm_sampler_with_n_evaluations(bench):
    model = bench.Ours("tiny-f32c8", "tiny", "sdpa")
    calls = []
    decoder = model.dec
    model.dec = lambda x, z: calls.append(x.shape) or decoder(x, z)
    z, noise = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = model.decode(z, noise, 3)
        # one step of gradient descent with eta = 1 / c(0) = 0.5 is the one-step decoder of DCSSDAE
        assert torch.allclose(model.decode(z, noise, 1), model.ae.decode(z, noise=noise, steps=1), atol=1e-6)
    assert len(calls) == 3 + 1 and x.shape == noise.shape


def test_a_network_that_fails_to_compile_runs_eagerly(bench, monkeypatch, capsys):
    def broken_compile(module, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("inductor is broken here")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = bench.main([*TINY, "--references", "none", "--parts", "encoder", "train", "--compile"])["rows"]
    assert "torch.compile failed for DC-SSDAE" in capsys.readouterr().out
    assert {r["part"] for r in rows} == {"encoder", "train"}
    assert all(r["speed"] > 0 and r["compiled"] is False for r in rows)


def test_bad_settings_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--steps", "0"])
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--parts", "backward"])
    with pytest.raises(ValueError, match="multiple of"):
        bench.main([*TINY, "--references", "none", "--sizes", "48", "--parts", "encoder"])


@pytest.mark.slow
def test_full_size_references_build_and_run(bench):
    rows = bench.main([*TINY, "--parts", "encoder", "decoder", "--steps", "1"])["rows"]
    params = {r["key"]: r["params_m"] for r in rows if r["part"] == "encoder"}
    assert params["dc-ae"] == pytest.approx(123.17, abs=0.01) and params["sd-vae"] == pytest.approx(
        34.16, abs=0.01
    )
    assert all(r["speed"] > 0 for r in rows)


def test_decoder_trains_after_an_inference_mode_call_at_the_same_size():
    """The decoder caches its window indices per grid size: one first built under torch.inference_mode (the
    benchmark's inference pass, Lightning's validation) must still serve a training step (dcssdae/decoder.py)."""
    from dcssdae import decoder as decoder_module
    from dcssdae import decoder_layers

    for backend in ("sdpa", "blocked"):
        decoder_layers._offset_index.cache_clear()
        decoder_layers._window_tiles.cache_clear()
        net = decoder_module.build_decoder("tiny", 8, attention_backend=backend)
        x, z = torch.randn(1, 3, 64, 64), torch.randn(1, 8, 2, 2)
        with torch.inference_mode():
            net(x, z)
        net(x, z).square().mean().backward()
        assert net.out_conv.weight.grad is not None
