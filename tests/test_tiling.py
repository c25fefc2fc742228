"""Tests of dcssdae.tiling and of DCSSDAE's padding, tiling and half precision (tiny presets, CPU)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dcssdae.autoencoder import DCSSDAE
from dcssdae.objectives import FlowMatching
from dcssdae.tiling import Tiling, crop, pad_to_multiple, tile_starts, tiled_call, window


def tiny_model(corruption=None, encoder: str = "tiny-f8c4", seed: int = 0) -> DCSSDAE:
    """Tiny DCSSDAE with every weight perturbed (no zero-initialised shortcuts)."""
    torch.manual_seed(seed)
    model = DCSSDAE(encoder, "tiny", corruption=corruption)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(shape, seed: int = 5) -> torch.Tensor:
    """Smooth images in [-1, 1] (bilinear upsampling of random 4 x 4 colours)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(shape[0], 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(small, size=shape[-2:], mode="bilinear", align_corners=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------------------------------------------
# dcssdae.tiling


@pytest.mark.parametrize("size,tile,overlap", [(64, 64, 16), (96, 64, 16), (200, 64, 32), (130, 64, 0)])
def test_tile_starts_cover_the_image_and_end_at_its_border(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_window_is_positive_and_ramps_over_the_overlap():
    w = window(64, 16, torch.float32, torch.device("cpu"))
    assert (w > 0).all() and torch.equal(w[16:48], torch.ones(32)) and torch.allclose(w, w.flip(0))
    assert (w[:16].diff() > 0).all()
    assert torch.equal(window(8, 0, torch.float32, torch.device("cpu")), torch.ones(8))


@pytest.mark.parametrize("tiling", [Tiling(32, 16), Tiling(48, 8), Tiling(64, 0)])
def test_tiled_call_of_a_local_map_is_exact(tiling):
    """For a map whose output at a pixel depends only on that pixel (and its latent cell), every tile agrees, so the
    blend must return the untiled output exactly: checks the tile/latent alignment and the normalisation."""
    x = torch.randn(2, 3, 80, 112)
    z = torch.randn(2, 4, 10, 14)

    def fn(x, z, t):
        return torch.tanh(x) * t + F.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    out = tiled_call(fn, x, (z,), (0.5,), tiling=tiling, factor=8)
    torch.testing.assert_close(out, fn(x, z, 0.5), rtol=1e-6, atol=1e-6)
    # encoder direction: the output is on the latent grid
    pooled = tiled_call(lambda x: F.avg_pool2d(x, 8), x, tiling=tiling, factor=8, out_factor=8)
    torch.testing.assert_close(pooled, F.avg_pool2d(x, 8), rtol=1e-6, atol=1e-6)


def test_tiled_call_of_a_non_local_map_blends_the_tiles_it_cut():
    """A map whose output depends on the whole tile (minus the tile's mean): tiled_call cuts 2 x 3 tiles, a pixel
    that one tile covers is that tile's output (up to the rounding of w * y / w), one that several cover lies
    between their outputs."""
    x = torch.randn(1, 2, 48, 80)
    calls = []

    def fn(tile):
        calls.append(tuple(tile.shape[-2:]))
        return tile - tile.mean()

    out = tiled_call(fn, x, tiling=Tiling(32, 8), factor=8)
    assert calls == [(32, 32)] * 6  # rows start at 0, 16 (shifted to the border); columns at 0, 24, 48
    torch.testing.assert_close(out[..., :16, :24], fn(x[..., :32, :32])[..., :16, :24], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., 32:, 56:], fn(x[..., 16:, 48:])[..., 16:, 8:], rtol=1e-6, atol=1e-6)
    a, b = fn(x[..., :32, :32])[..., 16:32, :24], fn(x[..., 16:48, :32])[..., :16, :24]  # two tiles overlap here
    assert ((out[..., 16:32, :24] - torch.minimum(a, b)) >= -1e-6).all()
    assert ((torch.maximum(a, b) - out[..., 16:32, :24]) >= -1e-6).all()
    assert not torch.allclose(out, x - x.mean())


def test_tiling_rejects_sizes_that_are_not_multiples_of_the_factor():
    with pytest.raises(ValueError, match="multiples of the compression factor"):
        tiled_call(lambda x: x, torch.zeros(1, 3, 64, 64), tiling=Tiling(60, 16), factor=8)
    with pytest.raises(ValueError, match="pad first"):
        tiled_call(lambda x: x, torch.zeros(1, 3, 60, 64), tiling=Tiling(32, 16), factor=8)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(32, 32)


def test_pad_to_multiple_reflects_and_crop_undoes_it():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    x_pad, size = pad_to_multiple(x, 4)
    assert x_pad.shape == (2, 3, 8, 8) and size == (5, 6)
    assert torch.equal(crop(x_pad, size), x)
    assert torch.equal(x_pad[..., 5, :6], x[..., 3, :])  # reflection: row 5 mirrors row 3
    tiny, _ = pad_to_multiple(x[..., :2, :2], 8)  # padding longer than the side: border repeated
    assert tiny.shape[-2:] == (8, 8) and torch.equal(tiny[..., 7, 7], x[..., 1, 1])
    assert pad_to_multiple(x_pad, 4)[0] is x_pad


# ----------------------------------------------------------------------------------------------------------------
# DCSSDAE: padding, tiling


def test_reconstruct_pads_any_size_and_crops_back():
    model = tiny_model()
    x = images((1, 3, 45, 70))
    with torch.no_grad():
        with pytest.raises(ValueError):
            model.reconstruct(x, steps=1)
        x_hat = model.reconstruct(x, pad=True, steps=1, generator=torch.Generator().manual_seed(0))
        x_pad, _ = pad_to_multiple(x, 8)
        noise = torch.randn(x_pad.shape, generator=torch.Generator().manual_seed(0))
        expected = model.decode(model.encode(x_pad), noise=noise, steps=1)[..., :45, :70]
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, expected)


def record_sizes(*modules: torch.nn.Module) -> tuple[list, list]:
    """Hooks that record the spatial size of every input each module is called on: (sizes per module, handles)."""
    sizes = [[] for _ in modules]
    handles = [m.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(tuple(args[0].shape[-2:])))
               for m, seen in zip(modules, sizes)]
    return sizes, handles


def test_tiled_decoding_cuts_tiles_draws_noise_once_and_stays_close_to_untiled():
    """Multi-step decoding with tiled network evaluations: the networks really run on 2 x 2 tiles of 64 px (96 px
    images, overlap 32), deterministic given the generator and close to the untiled decode (random weights: each
    tile's attention sees only the tile, which a trained decoder is more robust to). A tile that covers the image
    is no tiling: the networks see the whole image and the result is the untiled one. Tiled encoding: the same
    latent grid."""
    model = tiny_model()
    x = images((1, 3, 96, 96))
    with torch.no_grad():
        z = model.encode(x)
        whole = model.decode(z, steps=3, generator=torch.Generator().manual_seed(1))
        (enc_sizes, dec_sizes), handles = record_sizes(model.encoder, model.decoder)
        model.enable_tiling(tile=96, overlap=32)
        one_tile = model.decode(z, steps=3, generator=torch.Generator().manual_seed(1))
        z_one_tile = model.encode(x)
        assert enc_sizes == [(96, 96)] and dec_sizes == [(96, 96)] * 3
        enc_sizes.clear(), dec_sizes.clear()
        model.enable_tiling(tile=64, overlap=32)
        tiled = model.decode(z, steps=3, generator=torch.Generator().manual_seed(1))
        z_tiled = model.encode(x)
        assert enc_sizes == [(64, 64)] * 4 and dec_sizes == [(64, 64)] * 12  # 4 tiles per evaluation
        again = model.decode(z, steps=3, generator=torch.Generator().manual_seed(1))
        model.disable_tiling()
        for handle in handles:
            handle.remove()
    assert torch.equal(one_tile, whole) and torch.equal(tiled, again) and torch.equal(z_one_tile, z)
    assert not torch.equal(tiled, whole) and rel_err(tiled, whole) < 0.4  # random weights: only a loose bound
    assert z_tiled.shape == z.shape and not torch.equal(z_tiled, z) and torch.isfinite(z_tiled).all()
    with pytest.raises(ValueError, match="multiples of the compression factor"):
        model.enable_tiling(tile=60, overlap=16)


def test_tiled_decoding_with_flow_matching_and_the_adaptive_sampler():
    """t (FM) passes through to every tile; the adaptive sampler's shrinking batch cuts z along."""
    fm = tiny_model(FlowMatching())
    fm.enable_tiling(tile=32, overlap=16)
    eqm = tiny_model()
    eqm.enable_tiling(tile=32, overlap=16)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert fm.decode(z, steps=2).shape == (2, 3, 64, 64)
        x, nfe = eqm.decode(z, method="adaptive", max_steps=3, threshold=1e-9, return_nfe=True)
    assert x.shape == (2, 3, 64, 64) and nfe.tolist() == [3, 3]


# ----------------------------------------------------------------------------------------------------------------
# Half precision: a model cast with .to(dtype) encodes and decodes in that dtype, close to float32.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("corruption", [None, FlowMatching()], ids=["eqm", "fm"])
def test_half_precision_model_encodes_and_decodes_in_its_dtype(dtype, corruption):
    model = tiny_model(corruption)
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        z32 = model.encode(x)
        x32 = model.decode(z32, steps=2, generator=torch.Generator().manual_seed(0))
        model.to(dtype)
        z = model.encode(x)  # a float32 input is cast to the model's dtype
        x_hat = model.decode(z32, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.dtype == dtype and z.dtype == dtype and x_hat.dtype == dtype
    assert rel_err(z, z32) < 0.02
    assert rel_err(x_hat, x32) < 0.05  # FM: its time grid is rounded to the dtype, the main difference


def test_dcssdae_imports_and_runs_without_diffusers():
    """diffusers is an optional extra: `import dcssdae` and DCSSDAE work without it; AutoencoderDCSSD says what to
    install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['diffusers'] = None\n"  # makes `import diffusers` fail
        "import dcssdae\n"
        "ae = dcssdae.DCSSDAE('tiny-f8c4', 'tiny')\n"
        "assert 'diffusers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    dcssdae.AutoencoderDCSSD\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dcssdae[diffusers]" in result.stdout
