"""benchmarks/bench_quality.py end to end with tiny networks: `train` (EqM and FM, 4 steps, 2 snapshots) then
`evaluate` (2 crops per validation image, NFE 1 and 2, no rFID); the snapshot files, results.json and the figures,
the objective each run really trained with, and that training is a pure function of the seed."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from dcssdae.objectives import EquilibriumMatching, FlowMatching

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(ROOT / "tests" / "configs" / "cpu_tiny.yaml"),
        "--config", "{model: {init_args: {decoder_overrides: {}}}}"]  # the tiny decoder preset, 16 channels

spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
bq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bq)


def test_each_objective_builds_its_corruption_sampler_and_time_input(tmp_path):
    for objective, corruption, method in (("eqm", EquilibriumMatching, "gd"), ("fm", FlowMatching, "euler")):
        args = bq.parse_args(["train", *TINY, "--steps", "3", "--batch-size", "3"])
        cli = bq.build_run(objective, args, str(tmp_path))
        model = cli.model
        assert type(model.corruption) is corruption and model.ae.sampler["method"] == method
        assert model.ae.decoder.time_conditioned is (objective == "fm")
        assert cli.trainer.max_steps == 3 and cli.trainer.limit_val_batches == 0 and cli.datamodule.batch_size == 3
        assert cli.config["model"]["init_args"]["lr"] == 5.0e-4  # the rest comes from the quick-start config


@pytest.fixture(scope="module")
def work(tmp_path_factory, default_photo_shards):
    """Working directory with the default photo shards; train both objectives and evaluate them once."""
    work = tmp_path_factory.mktemp("bench_quality")
    shutil.copytree(default_photo_shards, work / "data" / "photos", ignore=shutil.ignore_patterns(".lock"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCSSDAE_DATA", str(work / "data"))
        mp.chdir(work)
        assert bq.main(["train", *TINY, "--steps", "4", "--evals", "2", "--out", "runs"]) == 0
        assert bq.main(["evaluate", "--runs", "runs", "--out", "eval", "--crops", "2", "--nfe-crops", "1", "--batch-size", "24",
                        "--nfe", "1", "2", "--no-rfid"]) == 0
        yield work


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # the files must load weights-only


def test_train_writes_one_file_per_objective_with_the_objective_it_trained(work):
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["eqm.pt", "fm.pt"]
    expected = {"eqm": ("dcssdae.objectives.EquilibriumMatching", "gd"),
                "fm": ("dcssdae.objectives.FlowMatching", "euler")}
    for objective, (class_path, method) in expected.items():
        record = load(work / "runs" / f"{objective}.pt")
        meta = record["meta"]
        assert record["objective"] == objective
        assert record["dcssdae_config"]["corruption"]["class_path"] == class_path
        assert record["dcssdae_config"]["sampler"]["method"] == method
        assert objective in meta["loss_terms"] and ({"eqm", "fm"} - {objective}).isdisjoint(meta["loss_terms"])
        assert sorted(record["snapshots"]) == [2, 4] and meta["steps_done"] == 4
        assert meta["images"] == 4 * meta["batch_size"] == 8 and len(record["loss"]) == 4
        state = record["snapshots"][4]
        assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
        assert not all(torch.equal(state[k], record["snapshots"][2][k]) for k in state)  # the weights moved
    # FM's decoder takes t (a time embedding EqM's lacks); the rest of the network is the same
    eqm_keys, fm_keys = (set(load(work / "runs" / f"{o}.pt")["snapshots"][4]) for o in ("eqm", "fm"))
    assert eqm_keys < fm_keys


def test_evaluate_writes_results_and_figures(work):
    results = json.loads((work / "eval" / "results.json").read_text())
    meta = results["meta"]
    assert meta["num_images"] == 16 and meta["nfe_num_images"] == 8 and meta["rfid"] is False  # 8 dev photos
    assert meta["perceptual"] == "stlpips_alex"
    assert set(results["runs"]) == {"eqm", "fm"}
    for run in results["runs"].values():
        assert [p["step"] for p in run["curve"]] == [2, 4]
        for point in run["curve"]:
            assert point["num_images"] == 12 and point["nfe"] == 8.0  # the configured 8-step samplers
            assert 0 < point["psnr"] < 60 and -1 <= point["ssim"] <= 1 and 0 <= point["stlpips_alex"] <= 2
            assert "rfid" not in point
    eqm, fm = results["runs"]["eqm"]["nfe_sweep"], results["runs"]["fm"]["nfe_sweep"]
    assert set(eqm) == {"gd", "nesterov", "adaptive"} and set(fm) == {"euler"}
    for method, points in {**eqm, **fm}.items():
        assert [p["nfe_budget"] for p in points] == [1, 2]
        for p in points:
            assert p["num_images"] == 6 and p["sampler"]["method"] == method
            if method == "adaptive":
                assert 1 <= p["nfe"] <= p["nfe_budget"]
            else:
                assert p["nfe"] == p["nfe_budget"]
    assert fm["euler"][0]["sampler"]["shift"] == 2.0  # from configs/experiments/dc_f32c32_fm.yaml
    for name in ("quality_vs_steps.png", "quality_vs_nfe.png"):
        data = (work / "eval" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_training_is_a_function_of_the_seed(work, monkeypatch):
    monkeypatch.setenv("DCSSDAE_DATA", str(work / "data"))
    monkeypatch.chdir(work)
    bq.main(["train", *TINY, "--objectives", "eqm", "--steps", "2", "--evals", "1", "--out", "again"])
    first, again = load(work / "runs" / "eqm.pt"), load(work / "again" / "eqm.pt")
    assert first["loss"][:2] == again["loss"]
    assert all(torch.equal(first["snapshots"][2][k], v) for k, v in again["snapshots"][2].items())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="--evals 5 is more than --steps 4"):
        bq.snapshot_steps(4, 5)
    assert bq.snapshot_steps(10, 3) == [3, 7, 10]
    with pytest.raises(ValueError, match="unknown objective 'ddpm'"):
        bq.objective_overlay("ddpm")
    with pytest.raises(FileNotFoundError, match="no eqm.pt / fm.pt"):
        bq.main(["evaluate", "--runs", str(tmp_path), "--no-rfid"])
