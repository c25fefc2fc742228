"""`dcssdae latents` (latent shards + stats.json) and `LatentDataModule`, on a tiny model and small image shards."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dcssdae.autoencoder import DCSSDAE
from dcssdae.data import LatentDataModule, ValShards, decode_image, read_shard, val_transform
from dcssdae.export import write_export
from dcssdae.latent_stats import measure_latent_stats
from dcssdae.latents import main
from dcssdae.shards import Item, write_shards

SIZE = 32  # 4 x 4 x 4 latents of the tiny f8c4 model
KEYS = [f"img{i}" for i in range(5)]


def png(seed: int, w: int, h: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    a = (a // 2 + np.linspace(0, 120, w, dtype=np.uint8)[None, :, None]).astype(np.uint8)  # not mirror-symmetric
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny export folder, its model, image shard pattern of 5 images in 3 shards, {key: png bytes})."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    model = DCSSDAE("tiny-f8c4", "tiny", sampler={"method": "gd", "steps": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export = write_export(model.eval(), root / "export")
    images = {key: png(i, 40 + 8 * i, 36) for i, key in enumerate(KEYS)}
    items = [Item(key, i % 3, key, data) for i, (key, data) in enumerate(images.items())]
    manifest = write_shards(items, root / "images", "img", 2, classes=["a", "b", "c"], progress=False)
    return export, model.eval(), str(root / "images" / manifest["pattern"]), images


def run(setup, out, *extra, workers="0"):
    export, _, shards, _ = setup
    return main(["--model", str(export), "--shards", shards, "--out", str(out), "--size", str(SIZE),
                 "--batch-size", "2", "--workers", workers, "--no-progress", *extra])


def samples(out) -> dict[str, dict]:
    """{key: {entry: bytes}} of every latent shard in `out`."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in read_shard(str(shard)):
            found[sample.pop("__key__")] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return found


def load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def encode_input(image_bytes: bytes) -> torch.Tensor:
    """An image preprocessed as validation: (1, 3, SIZE, SIZE) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(val_transform(decode_image(image_bytes), SIZE), dtype=np.float32))
    return x.permute(2, 0, 1)[None] / 127.5 - 1


def encode(model, image_bytes: bytes, mirror: bool = False):
    """The model's own posterior of an image (or of its mirror image)."""
    x = encode_input(image_bytes)
    with torch.no_grad():
        return model.posterior(x.flip(-1) if mirror else x)


def test_one_sample_per_image_with_mean_std_and_stats(setup, tmp_path):
    _, model, shards, images = setup
    assert run(setup, tmp_path / "out", workers="1") == 0
    found = samples(tmp_path / "out")
    assert sorted(found) == KEYS
    for i, key in enumerate(KEYS):
        assert set(found[key]) == {"cls", "mean.npy", "std.npy"} and int(found[key]["cls"]) == i % 3
        mean, std = load(found[key]["mean.npy"]), load(found[key]["std.npy"])
        assert mean.shape == std.shape == (4, 4, 4) and mean.dtype == std.dtype == np.float16
        q = encode(model, images[key])
        torch.testing.assert_close(torch.from_numpy(mean).float(), q.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(std).float(), q.std[0], atol=2e-3, rtol=2e-3)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert stats["count"] == manifest["total"] == 5 and stats["latent_shape"] == [4, 4, 4]
    assert manifest["shards"] == {"img-000000.tar": 2, "img-000001.tar": 2, "img-000002.tar": 1}
    assert manifest["classes"] == ["a", "b", "c"]
    # the convention and the numbers of `dcssdae latent-stats` on the same images
    reference = measure_latent_stats(model, ValShards(shards, SIZE, 2, rank=0, world_size=1))
    assert stats["scaling_factor"] == pytest.approx(1 / reference["std"], rel=1e-6)
    assert stats["shift_factor"] == 0.0 and stats["mean"] == pytest.approx(reference["mean"], rel=1e-6)
    means = torch.cat([encode(model, images[key]).mean for key in KEYS]).double()  # (5, 4, 4, 4)
    np.testing.assert_allclose(stats["channel_mean"], means.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["channel_std"], means.std((0, 2, 3), correction=0), rtol=1e-5)
    assert run(setup, tmp_path / "shifted", "--shift") == 0
    assert json.loads((tmp_path / "shifted" / "stats.json").read_text())["shift_factor"] == pytest.approx(
        reference["mean"], rel=1e-6)


def test_second_run_rewrites_nothing_and_a_lost_shard_is_rewritten(setup, tmp_path):
    out = tmp_path / "out"
    assert run(setup, out) == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 3 + 3 + 2  # shards, their records, manifest.json + stats.json
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert run(setup, out) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    (out / "img-000001.tar").unlink()  # e.g. lost, or a run killed before its rename
    assert run(setup, out) == 0
    changed = {p.name for p in out.rglob("*") if p.is_file() and p.stat().st_mtime_ns != mtimes.get(p)}
    assert changed == {"img-000001.tar", "img-000001.tar.json"}
    assert run(setup, out, "--dtype", "float32") == 0  # other settings: every shard again
    assert load(samples(out)["img0"]["mean.npy"]).dtype == np.float32


def test_decoding_a_stored_mean_equals_decoding_the_models_encoding(setup, tmp_path):
    """float32: the same image; float16 (the default): within a quarter of an 8-bit grey level (2 / 255 in [-1, 1])."""
    _, model, _, images = setup
    for dtype, key, atol in (("float32", "img0", 1e-5), ("float16", "img3", 0.25 * 2 / 255)):
        assert run(setup, tmp_path / dtype, "--dtype", dtype) == 0
        stored = torch.from_numpy(load(samples(tmp_path / dtype)[key]["mean.npy"]).astype(np.float32))[None]
        with torch.no_grad():
            own = model.encode(encode_input(images[key]))
            noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(model.decode(stored, noise=noise, steps=1),
                                       model.decode(own, noise=noise, steps=1), atol=atol, rtol=0)


def test_flip_stores_the_mirrored_images_latents(setup, tmp_path):
    _, model, _, images = setup
    assert run(setup, tmp_path / "out", "--flip", "--dtype", "float32") == 0
    entry = samples(tmp_path / "out")["img2"]
    assert set(entry) == {"cls", "mean.npy", "std.npy", "mean_flip.npy", "std_flip.npy"}
    mirrored = encode(model, images["img2"], mirror=True)
    torch.testing.assert_close(torch.from_numpy(load(entry["mean_flip.npy"])), mirrored.mean[0], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(load(entry["std_flip.npy"])), mirrored.std[0], atol=1e-5, rtol=1e-5)
    assert not np.allclose(load(entry["mean_flip.npy"]), load(entry["mean.npy"]), atol=1e-3)


def test_a_corrupt_image_is_reported_and_skipped(setup, tmp_path, capsys):
    export, _, _, images = setup
    shard = tmp_path / "bad" / "bad-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:  # shards written by another tool: nothing checked them
        for key, data in (("good", images["img0"]), ("cut", images["img1"][:300]), ("good2", images["img2"])):
            for name, payload in ((f"{key}.png", data), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    assert main(["--model", str(export), "--shards", str(shard), "--out", str(out), "--size", str(SIZE),
                 "--workers", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {shard}: cut: corrupt or truncated PNG" in err
    assert sorted(samples(out)) == ["good", "good2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 2 and manifest["skipped"][0]["key"] == "cut"
    assert json.loads((out / "stats.json").read_text())["count"] == 2


def test_bad_arguments_are_one_line_errors(setup, tmp_path, capsys):
    export, _, shards, _ = setup
    assert main(["--model", str(export), "--shards", str(tmp_path / "no-{0..1}.tar"), "--out", str(tmp_path)]) == 2
    assert "2 of 2 shard file(s) not found" in capsys.readouterr().err
    assert main(["--model", str(export), "--shards", shards, "--out", str(tmp_path), "--size", "36"]) == 2
    assert "--size 36 is not a multiple of the model's downsample factor 8" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none"), "--shards", shards, "--out", str(tmp_path)]) == 2
    assert "no model at" in capsys.readouterr().err


def test_two_ranks_write_disjoint_shards_and_the_stats_merge(setup, tmp_path, monkeypatch):
    assert run(setup, tmp_path / "one") == 0
    out = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    written = []
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        before = set(out.glob("*.tar"))
        assert run(setup, out) == 0
        written.append(set(out.glob("*.tar")) - before)
        assert (out / "stats.json").exists() == (rank == "0")  # written once every shard is there
    assert {p.name for p in written[0]} == {"img-000001.tar"}
    assert {p.name for p in written[1]} == {"img-000000.tar", "img-000002.tar"}
    one, two = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    for name in ("count", "scaling_factor", "mean", "channel_mean", "channel_std"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12)
    assert samples(out).keys() == samples(tmp_path / "one").keys()


def _rank(rank: int, setup, out, port: int) -> None:
    from dcssdae import latents

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    gather, calls = latents.gather_records, []

    def spy(records, *args):
        calls.append((set(records), args[-1]))  # this rank's own records, and whether they go over the group
        return gather(records, *args)

    latents.gather_records = spy
    assert run(setup, out) == 0
    own = {"img-000000.tar", "img-000002.tar"} if rank == 0 else {"img-000001.tar"}
    assert calls == [(own, True)]


def test_torch_distributed_ranks_gather_their_records(setup, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(setup, tmp_path / "out", port), nprocs=2, start_method="fork")
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["count"] == 5
    records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "parts").glob("*.json")}
    assert sorted(records) == ["img-000000.tar.json", "img-000001.tar.json", "img-000002.tar.json"]


# ------------------------------------------------------------------------------------------------
# LatentDataModule


@pytest.fixture(scope="module")
def latents(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_shards") / "out"
    assert run(setup, out, "--flip", "--dtype", "float32") == 0
    return out


def test_datamodule_batches_scaled_latents_and_labels(latents):
    stats = json.loads((latents / "stats.json").read_text())
    stored = samples(latents)
    dm = LatentDataModule(str(latents), str(latents), batch_size=2, num_workers=0, sample_posterior=False,
                          flip=False)
    dm.setup("fit")
    assert dm.latent_shape == (4, 4, 4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (2, 4, 4, 4) and batch["latent"].dtype == torch.float32
    for z, label, key in zip(batch["latent"], batch["label"], batch["key"]):
        raw = torch.from_numpy(load(stored[key]["mean.npy"]))
        torch.testing.assert_close(z, (raw - stats["shift_factor"]) * stats["scaling_factor"])
        torch.testing.assert_close(dm.scaling.unscale(z), raw)
        assert label == int(stored[key]["cls"])
    # posterior draws: mean + std * noise, reproducible from the seed; mirrored latents used half the time
    a, b = (next(iter(LatentDataModule(str(latents), batch_size=5, num_workers=0, normalize="none", seed=3)
                      .train_dataloader())) for _ in range(2))
    assert torch.equal(a["latent"], b["latent"])
    for z, key in zip(a["latent"], a["key"]):
        options = [(load(stored[key][f"mean{s}.npy"]), load(stored[key][f"std{s}.npy"])) for s in ("", "_flip")]
        scores = [np.abs((z.numpy() - mean) / std).max() for mean, std in options]
        assert min(scores) < 6 and min(np.abs(z.numpy() - mean).max() for mean, _ in options) > 0
    channel = LatentDataModule(str(latents), str(latents), batch_size=5, num_workers=0, normalize="channel")
    channel.setup("fit")
    z = next(iter(channel.val_dataloader()))["latent"].double()  # validation: every posterior mean once
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(4, dtype=torch.float64), atol=1e-5,
                               rtol=0)


def test_datamodule_ddp_split(latents):
    def keys(loader):
        return [k for batch in loader for k in batch["key"]]

    val, train = {}, {}
    for rank in (0, 1):
        dm = LatentDataModule(str(latents), str(latents), batch_size=2, num_workers=0)
        dm.setup("fit")
        dm._rank_world = lambda rank=rank: (rank, 2)  # what a trainer's global_rank / world_size give
        val[rank] = keys(dm.val_dataloader())
        train[rank] = [batch["latent"] for batch in dm.train_dataloader()]
    assert not set(val[0]) & set(val[1]) and sorted(val[0] + val[1]) == KEYS  # every latent once
    assert len(train[0]) == len(train[1]) == 2  # ceil(5 / (2 ranks x 2)) batches per rank
    assert not torch.equal(train[0][0], train[1][0])  # each rank its own stream


def test_datamodule_errors(tmp_path, latents):
    with pytest.raises(FileNotFoundError, match="no manifest.json of `dcssdae latents`"):
        LatentDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="stats.json"):
        LatentDataModule(str(latents / "img-000000.tar"), stats=str(tmp_path / "none.json")).setup("fit")
    with pytest.raises(ValueError, match="normalize must be one of"):
        LatentDataModule(str(latents), normalize="per-channel")


# ------------------------------------------------------------------------------------------------
# The example: a DiT trained on the latents, its samples decoded


def test_example_trains_a_dit_and_decodes_its_samples(setup, latents, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_latent_dit.py"
    spec = importlib.util.spec_from_file_location("train_latent_dit", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "dit.png"
    summary = example.main(["--model", str(setup[0]), "--latents", str(latents), "--out", str(out), "--steps", "3",
                            "--batch-size", "4", "--width", "32", "--depth", "1", "--heads", "2", "--samples", "2",
                            "--sample-steps", "2", "--decode-steps", "1", "--workers", "0"])
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert Image.open(out).size == (2 * SIZE + 3 * 2, 2 * SIZE + 3 * 2)  # references over samples, 2 px padding


def test_encode_benchmark_compares_the_same_weights(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encode.py"
    spec = importlib.util.spec_from_file_location("bench_encode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--encoder", "tiny-f32c8", "--images", "4", "--size", "32", "--batch-size", "2",
                         "--workers", "0", "--rounds", "1", "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert result["max_abs_diff"] < 1e-4  # diffusers' weights, converted: the same latents
    assert set(result["images_per_s"]) == {"dcssdae_latents", "diffusers_network", "dcssdae_network"}
    assert result["ratio"] > 0 and result["network_ratio"] > 0
