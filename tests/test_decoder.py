"""SSDD U-ViT decoder (dcssdae/decoder.py): shapes, conditioning, attention window and bias, numerics."""

import warnings

import pytest
import torch

from dcssdae.decoder import DECODERS, UViTDecoder, WindowAttention, build_decoder


def _tiny(latent_channels=8, **overrides) -> UViTDecoder:
    torch.manual_seed(0)
    return build_decoder("tiny", latent_channels, **overrides)


def _randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that the zero-initialised layers no longer hide dependencies."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def _inputs(batch, side, f, latent_channels=8, width=None):
    H, W = side, width or side
    return torch.randn(batch, 3, H, W), torch.randn(batch, latent_channels, H // f, W // f)


# ----------------------------------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize(
    "side,f",
    [(64, 8), (64, 16), (64, 32), (64, 64), (96, 8), (96, 16), (96, 32), (128, 128), (256, 128)],
)
def test_shapes_every_factor(side, f):
    dec = _tiny()
    x_t, z = _inputs(2, side, f)
    pred, tokens = dec(x_t, z, return_tokens_at=1)
    assert pred.shape == x_t.shape
    assert tokens.shape == (2, (side // 8) ** 2, dec.mid_dim)
    assert torch.isfinite(pred).all()


def test_non_square_image_and_latent():
    dec = _randomize_(_tiny())
    x_t, z = _inputs(1, 64, 32, width=96)  # z (1, 8, 2, 3)
    pred, tokens = dec(x_t, z, return_tokens_at=0)
    assert pred.shape == (1, 3, 64, 96) and tokens.shape == (1, 8 * 12, dec.mid_dim)


def test_tokens_are_taken_after_the_requested_block():
    dec = _randomize_(_tiny())
    x_t, z = _inputs(2, 64, 16)
    captured = []
    dec.mid.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    pred0, tokens0 = dec(x_t, z, return_tokens_at=0)
    pred1, tokens1 = dec(x_t, z, return_tokens_at=1)
    torch.testing.assert_close(tokens0, captured[0])
    assert not torch.allclose(tokens0, tokens1)
    torch.testing.assert_close(pred0, pred1)  # asking for tokens does not change the prediction
    torch.testing.assert_close(dec(x_t, z), pred0)


def test_prediction_is_zero_at_init():
    dec = _tiny()
    x_t, z = _inputs(2, 64, 16)
    assert dec(x_t, z).abs().max() == 0


# ----------------------------------------------------------------------------------------------------
# Conditioning: time, z.


def test_unconditioned_decoder_has_no_time_modules():
    eqm, fm = _tiny(), _tiny(time_conditioned=True)
    assert not any("time" in name for name, _ in eqm.named_parameters())
    extra = sum(p.numel() for p in fm.parameters()) - sum(p.numel() for p in eqm.parameters())
    assert extra == sum(p.numel() for p in fm.time_mlp.parameters()) > 0


def test_time_conditioning_changes_the_prediction():
    dec = _randomize_(_tiny(time_conditioned=True))
    x_t, z = _inputs(2, 64, 16)
    a = dec(x_t, z, torch.tensor([0.1, 0.1]))
    b = dec(x_t, z, torch.tensor([0.9, 0.9]))
    assert (a - b).abs().mean() > 1e-4
    torch.testing.assert_close(dec(x_t, z, torch.tensor(0.1)), a)  # a scalar t is broadcast


def test_prediction_depends_on_z():
    dec = _randomize_(_tiny())
    x_t, z = _inputs(2, 64, 16)
    assert (dec(x_t, z) - dec(x_t, z + 1)).abs().mean() > 1e-4


def test_latent_skip_adds_a_linear_map_of_z_upsampled():
    """latent_skip: the image channels of the prediction get conv1x1(z) upsampled bilinearly; zero at init, linear
    in z, and the network part is unchanged (same weights give the same prediction minus the skip)."""
    plain, skip = _tiny(), _tiny(latent_skip=True)
    x_t, z = _inputs(2, 64, 16)
    assert skip(x_t, z).abs().max() == 0  # both parts start at zero
    skip.load_state_dict(_randomize_(plain).state_dict(), strict=False)
    with torch.no_grad():
        skip.latent_skip.weight.normal_()
        skip.latent_skip.bias.normal_()
    low = torch.nn.functional.interpolate(skip.latent_skip(z), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(skip(x_t, z), plain(x_t, z) + low)
    assert low[:, :, :16, :16].std() > 0.1  # the skip varies over the image (not a constant colour)
    with torch.no_grad():
        plain.out_conv.weight.zero_(), plain.out_conv.bias.zero_()
        skip.out_conv.weight.zero_(), skip.out_conv.bias.zero_()
    torch.testing.assert_close(skip(x_t, 2 * z) - skip.latent_skip.bias[:, None, None],
                               2 * (skip(x_t, z) - skip.latent_skip.bias[:, None, None]))  # linear in z
    assert sum(p.numel() for p in skip.parameters()) - sum(p.numel() for p in plain.parameters()) == 8 * 3 + 3


@pytest.mark.parametrize(
    "kwargs,x_shape,z_shape,match",
    [
        ({}, (2, 3, 60, 64), (2, 8, 2, 2), "multiple of 8"),
        ({}, (2, 3, 64, 64), (2, 8, 3, 3), "must divide"),
        ({}, (2, 3, 64, 64), (2, 8, 16, 16), "multiple of 8"),  # f = 4
        ({}, (2, 3, 64, 64), (2, 4, 2, 2), r"z must be \(2, 8"),
        ({}, (2, 3, 64, 64), (3, 8, 2, 2), r"z must be \(2, 8"),
        ({}, (2, 4, 64, 64), (2, 8, 2, 2), r"x_t must be \(B, 3"),
        ({"t": torch.zeros(2)}, (2, 3, 64, 64), (2, 8, 2, 2), "no time conditioning"),
        ({"return_tokens_at": 2}, (2, 3, 64, 64), (2, 8, 2, 2), "return_tokens_at"),
    ],
)
def test_bad_inputs_raise(kwargs, x_shape, z_shape, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(torch.randn(x_shape), torch.randn(z_shape), **kwargs)


def test_time_conditioned_decoder_needs_t():
    dec = _tiny(time_conditioned=True)
    with pytest.raises(ValueError, match="pass t"):
        dec(*_inputs(2, 64, 16))
    with pytest.raises(ValueError, match="scalar or have shape"):
        dec(*_inputs(2, 64, 16), torch.zeros(3))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="known: tiny, XS, S"):
        build_decoder("XXL", 32)
    with pytest.raises(ValueError, match="odd"):
        build_decoder("tiny", 32, window=16)
    with pytest.raises(ValueError, match="attention_backend"):
        build_decoder("tiny", 32, attention_backend="xformers")
    with pytest.raises(ValueError, match="4 levels"):
        build_decoder("tiny", 32, channel_mult=(1, 2, 2))


# ----------------------------------------------------------------------------------------------------
# Windowed attention with relative position bias.


def _reference_bias(table: torch.Tensor, Hg: int, Wg: int) -> torch.Tensor:
    """Brute force: bias[h, i, j] = table[h, dy + r, dx + r] with (dy, dx) = key - query, -inf outside."""
    heads, side, _ = table.shape
    r = side // 2
    out = torch.full((heads, Hg * Wg, Hg * Wg), float("-inf"))
    for i in range(Hg * Wg):
        for j in range(Hg * Wg):
            dy, dx = j // Wg - i // Wg, j % Wg - i % Wg
            if abs(dy) <= r and abs(dx) <= r:
                out[:, i, j] = table[:, dy + r, dx + r]
    return out


@pytest.mark.parametrize("window,grid", [(5, (6, 7)), (17, (4, 5)), (3, (3, 3))])
def test_window_bias_matches_brute_force(window, grid):
    attn = WindowAttention(dim=16, heads=2, window=window, backend="sdpa")
    with torch.no_grad():
        attn.rel_bias.normal_()
    torch.testing.assert_close(attn.window_bias(grid), _reference_bias(attn.rel_bias.detach(), *grid))


def test_attention_is_local():
    torch.manual_seed(0)
    attn = _randomize_(WindowAttention(dim=16, heads=2, window=5, backend="sdpa"), std=0.5)
    grid = (10, 10)
    x = torch.randn(2, 100, 16)
    query, near, far = 5 * 10 + 5, 5 * 10 + 7, 5 * 10 + 8  # (5, 5); dx = 2 is inside r = 2, dx = 3 is outside
    out = attn(x, grid)
    x_far, x_near = x.clone(), x.clone()
    x_far[:, far] += 10.0
    x_near[:, near] += 10.0
    assert torch.equal(attn(x_far, grid)[:, query], out[:, query])
    assert (attn(x_near, grid)[:, query] - out[:, query]).abs().max() > 1e-3


def test_window_larger_than_grid_sees_everything():
    attn = _randomize_(WindowAttention(dim=16, heads=2, window=17, backend="sdpa"), std=0.5)
    x = torch.randn(1, 64, 16)
    x_corner = x.clone()
    x_corner[:, 63] += 10.0  # offset (7, 7) from token 0, inside r = 8
    assert (attn(x_corner, (8, 8))[:, 0] - attn(x, (8, 8))[:, 0]).abs().max() > 1e-3


def test_relative_bias_is_used_and_never_cached():
    dec = _randomize_(_tiny())
    x_t, z = _inputs(2, 64, 16)
    before = dec(x_t, z)
    with torch.no_grad():  # an in-place update (as an optimizer does) must show in the next forward
        dec.mid.blocks[0].attn.rel_bias.normal_(std=2.0)
    assert (dec(x_t, z) - before).abs().mean() > 1e-4


def test_gradients_reach_the_bias_table():
    dec = _randomize_(_tiny())
    x_t, z = _inputs(2, 64, 16)  # 8x8 token grid, window 17: offsets +-8 never occur
    dec(x_t, z).square().mean().backward()
    for block in dec.mid.blocks:
        grad = block.attn.rel_bias.grad  # (heads, 17, 17)
        assert grad.abs()[:, 1:-1, 1:-1].min() > 0  # every offset within +-7 is used
        assert grad[:, 0].abs().max() == 0 and grad[:, :, -1].abs().max() == 0  # +-8 are not


def test_flex_backend_matches_sdpa_forward():
    attn = _randomize_(WindowAttention(dim=32, heads=2, window=5, backend="sdpa"), std=0.5)
    x = torch.randn(2, 12 * 10, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        expected = attn(x, (12, 10))
        attn.backend = "flex"
        torch.testing.assert_close(attn(x, (12, 10)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_backend_matches_sdpa_on_cuda_with_gradients(monkeypatch):
    # TF32 convolutions (cuDNN's default) round their inputs to 10 mantissa bits, which turns the two
    # attention kernels' last-bit differences into ~1e-3 output differences (seen on an H100): compare in
    # true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    dec = _randomize_(build_decoder("tiny", 8, attention_backend="sdpa")).cuda()
    flex = _randomize_(build_decoder("tiny", 8, attention_backend="flex")).cuda()
    flex.load_state_dict(dec.state_dict())
    x_t, z = (a.cuda() for a in _inputs(2, 128, 16))
    for model in (dec, flex):
        model(x_t, z).square().mean().backward()
    torch.testing.assert_close(flex(x_t, z), dec(x_t, z), atol=1e-4, rtol=1e-4)
    for a, b in zip(dec.mid.blocks, flex.mid.blocks, strict=True):
        torch.testing.assert_close(b.attn.rel_bias.grad, a.attn.rel_bias.grad, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------
# No batch statistics, numerics, initialisation.


def test_no_batch_statistics():
    dec = _tiny()
    assert list(dec.buffers()) == []  # no BatchNorm running stats, no cached bias tables
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in dec.modules())


def test_samples_are_independent_in_a_batch():
    dec = _randomize_(_tiny()).train()
    x_t, z = _inputs(3, 64, 16)
    x_t.requires_grad_(True)
    pred = dec(x_t, z)
    torch.testing.assert_close(dec(x_t[:1], z[:1]), pred[:1], atol=1e-5, rtol=1e-5)
    pred[0].sum().backward()
    assert x_t.grad[1:].abs().max() == 0 and x_t.grad[0].abs().max() > 0


def test_bf16_autocast_forward_backward_is_finite():
    dec = _randomize_(_tiny(time_conditioned=True))
    x_t, z = _inputs(2, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, tokens = dec(x_t, z, torch.rand(2), return_tokens_at=0)
        loss = pred.float().square().mean() + tokens.float().square().mean()
    loss.backward()
    assert torch.isfinite(pred.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in dec.parameters())


@pytest.mark.parametrize("latent_skip", [False, True])
def test_zero_init_does_not_block_learning(latent_skip):
    """From the zero-initialised outputs, four backward passes (three SGD steps) reach every parameter."""
    dec = _tiny(time_conditioned=True, latent_skip=latent_skip)
    opt = torch.optim.SGD(dec.parameters(), lr=0.1)
    x_t, z = _inputs(2, 64, 16)
    target = torch.randn_like(x_t)
    for step in range(4):  # gradients accumulate: p.grad != 0 at the end iff some pass reached p
        (dec(x_t, z, torch.rand(2)) - target).square().mean().backward()
        if step < 3:
            opt.step()
    unreached = [name for name, p in dec.named_parameters() if p.grad is None or not p.grad.any()]
    assert unreached == []


@pytest.mark.parametrize(
    "name,widths,heads,low,high",
    [("S", [64, 96, 160, 160], 4, 13.0e6, 13.6e6), ("M", [96, 192, 288, 288], 4, 47.5e6, 49.5e6)],
)
def test_preset_sizes(name, widths, heads, low, high):
    with torch.device("meta"):
        dec = build_decoder(name, 32)
    assert dec.widths == widths and dec.mid_heads == heads and dec.mid_depth == DECODERS[name]["mid_depth"]
    assert low < sum(p.numel() for p in dec.parameters()) < high


# ----------------------------------------------------------------------------------------------------
# Fast paths (channels-last conv levels, in-place inference ops, blocked attention) against the reference path
# (NCHW, the dense-bias "sdpa" attention, out-of-place ops): the same function, the same parameters.


def _assert_same(actual, expected, rel=1e-5, msg=None):
    """Equal up to fp32 reassociation (the paths sum in other orders): `rel` of the tensor's largest entry."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=rel * scale + 1e-7, rtol=1e-4, msg=msg)


def _reference_and_fast(window=17, **overrides):
    """Two copies of one randomised tiny decoder: the reference path and the default (fast) one."""
    ref = _randomize_(_tiny(window=window, attention_backend="sdpa", **overrides), std=0.2)
    ref.channels_last = False
    fast = _tiny(window=window, **overrides)
    fast.load_state_dict(ref.state_dict())
    assert fast.channels_last and fast.mid.blocks[0].attn.backend == "auto"
    return ref, fast


@pytest.mark.parametrize("window,side", [(17, 80), (5, 96), (3, 72)])  # grids 10x10 (window > grid), 12x12, 9x9
def test_fast_path_matches_reference_in_eval(window, side):
    ref, fast = _reference_and_fast(window)
    x_t, z = _inputs(2, side, 8)
    with torch.inference_mode():  # the in-place path
        expected, fast_pred = ref(x_t, z), fast(x_t, z)
    _assert_same(fast_pred, expected)
    assert fast_pred.is_contiguous()  # NCHW out, whatever the path inside
    _assert_same(fast(x_t, z), expected)  # autograd on: the out-of-place path


def test_fast_path_matches_reference_in_train_with_gradients():
    ref, fast = _reference_and_fast(17, time_conditioned=True)
    ref.train(), fast.train()
    x_t, z = _inputs(2, 80, 16)  # 10x10 token grid: not a multiple of the 8x8 tile, smaller than the window
    t = torch.rand(2)
    target = torch.randn_like(x_t)
    outs = []
    for model in (ref, fast):
        xg = x_t.clone().requires_grad_(True)
        pred, tokens = model(xg, z, t, return_tokens_at=0)
        ((pred - target).square().mean() + tokens.square().mean()).backward()
        outs.append((pred, tokens, xg.grad))
    for a, b in zip(*outs, strict=True):
        _assert_same(b, a)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in fast.named_parameters():
        # a weight gradient sums over every pixel of the batch: 1e-4 of its largest entry
        _assert_same(p.grad, grads[name], rel=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("window,grid", [(5, (6, 7)), (17, (4, 5)), (3, (3, 3)), (17, (19, 10)), (1, (2, 3))])
def test_blocked_attention_matches_dense_with_gradients(window, grid):
    _assert_blocked_matches_dense(window, grid)


def _assert_blocked_matches_dense(window, grid):  # values and gradients (input and bias table)
    attn = _randomize_(WindowAttention(dim=16, heads=2, window=window, backend="sdpa"), std=0.5)
    x = torch.randn(2, grid[0] * grid[1], 16, requires_grad=True)
    results = []
    for backend in ("sdpa", "blocked"):
        attn.backend, attn.rel_bias.grad, x.grad = backend, None, None
        out = attn(x, grid)
        out.square().sum().backward()
        results.append((out, x.grad, attn.rel_bias.grad))
    for a, b in zip(*results, strict=True):
        _assert_same(b, a)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend 'dense'"):
        WindowAttention(dim=16, heads=2, window=5, backend="dense")


@pytest.mark.parametrize(
    "name,digest",
    [
        ("tiny", "95d94ae0b1b0b7a10d82032f1b05dbfe40702847c0ea93e42af60d939a23c56a"),
        ("S", "15ca9e60095495060a684c6eb388ba228b2f12f8f2f7a837899a4606ae01be38"),
    ],
)
def test_state_dict_layout_is_unchanged(name, digest):
    """Checkpoints saved before the fast paths load: the digest of (key, shape) was taken from the decoder of
    commit b518a3f (reference path only), and no backend or memory format adds, drops or reshapes a tensor."""
    import hashlib

    for backend in ("auto", "sdpa", "blocked", "flex"):
        with torch.device("meta"):
            dec = build_decoder(name, 32, attention_backend=backend)
        text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in dec.state_dict().items())
        assert hashlib.sha256(text.encode()).hexdigest() == digest, backend


@pytest.mark.slow  # torch.compile on the CPU: about a minute
def test_compile_switch_keeps_weights_and_outputs(monkeypatch):
    """DCSSDAE.compile(): one call compiles encoder and decoder in place; same state-dict keys, same decode
    (the compiled graph fuses the AdaGN modulation instead of running it in place; the two large levels run the
    lean blocks, eagerly, between compiled pieces), and it still trains."""
    from dcssdae.autoencoder import DCSSDAE

    torch.manual_seed(0)
    ae = _randomize_(DCSSDAE("tiny-f32c8", "tiny")).eval()
    z, noise = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 64, 64)
    ae.decoder.lean_min_pixels = None
    with torch.inference_mode():
        expected = ae.decode(z, noise=noise, steps=1)
    ae.decoder.lean_min_pixels = 32 * 32  # levels 0 and 1 (64^2, 32^2) lean, the others compiled as usual
    calls = _count_lean_calls(monkeypatch)
    keys = list(ae.state_dict())
    assert ae.compile() is ae and list(ae.state_dict()) == keys
    with torch.inference_mode():
        _assert_same(ae.decode(z, noise=noise, steps=1), expected)
    assert calls  # the lean blocks ran inside the compiled decoder
    ae.decoder(noise, z).square().mean().backward()
    assert ae.decoder.out_conv.weight.grad.abs().sum() > 0


def test_partly_frozen_decoder_trains_like_the_reference():
    """Phase 3 freezes every level but the last: the frozen levels' features need no gradient while the trainable
    blocks' modulations do, so the fast path must not write in place there (regression: addcmul(out=...) with a
    scale that requires grad)."""
    ref, fast = _reference_and_fast(5)
    for model in (ref, fast):
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("dec.l0_", "out_")))
    x_t, z = _inputs(2, 32, 8)
    grads = []
    for model in (ref, fast):
        model(x_t, z).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        _assert_same(grads[1][name], g, rel=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------
# Lean inference path (ResBlock.lean: row stripes, the up conv in sub-pixel form inside the next block).


def _reference_and_lean(min_pixels, stripe_rows, **overrides):
    ref, lean = _reference_and_fast(5, **overrides)
    lean.lean_min_pixels, lean.stripe_rows = min_pixels, stripe_rows
    return ref, lean


def _count_lean_calls(monkeypatch):
    from dcssdae import decoder

    calls, lean = [], decoder.ResBlock.lean
    monkeypatch.setattr(decoder.ResBlock, "lean", lambda block, *a, **k: calls.append(1) or lean(block, *a, **k))
    return calls


@pytest.mark.parametrize(
    "side,width,f,batch,min_pixels,stripe_rows",
    [
        (64, 96, 8, 2, 1, 6),  # every level lean, non-square, stripes that do not divide the heights
        (64, 64, 16, 1, 32 * 32, 5),  # levels 0 and 1 lean (the input head is recomputed), odd stripes
        (64, 64, 32, 3, 64 * 64, 16),  # level 0 only (the input head is held), batch 3
        (128, 64, 64, 1, 1, 7),
        (128, 128, 128, 2, 32 * 32, 4),
    ],
)
def test_lean_path_matches_reference(monkeypatch, side, width, f, batch, min_pixels, stripe_rows):
    ref, lean = _reference_and_lean(min_pixels, stripe_rows, time_conditioned=True, latent_skip=f == 16)
    x_t, z = _inputs(batch, side, f, width=width)
    t = torch.rand(batch)
    inputs = (x_t.clone(), z.clone())
    calls = _count_lean_calls(monkeypatch)
    with torch.inference_mode():
        expected, pred = ref(x_t, z, t), lean(x_t, z, t)
    assert calls  # the lean path ran
    _assert_same(pred, expected)
    assert pred.is_contiguous()
    assert torch.equal(x_t, inputs[0]) and torch.equal(z, inputs[1])  # the caller's inputs are never written


def test_lean_path_only_without_autograd(monkeypatch):
    ref, lean = _reference_and_lean(1, 4)
    x_t, z = _inputs(1, 32, 8)
    calls = _count_lean_calls(monkeypatch)
    pred = lean(x_t, z)  # autograd on: the regular path
    assert not calls and pred.requires_grad
    lean.lean_min_pixels = None
    with torch.no_grad():
        lean(x_t, z)
    assert not calls  # switched off
    lean.lean_min_pixels = 1
    with torch.no_grad():
        _assert_same(lean(x_t, z), ref(x_t, z))
    assert calls


def test_lean_block_consumes_its_parts_and_reuses_the_given_map():
    from dcssdae.decoder import ResBlock

    torch.manual_seed(0)
    block = _randomize_(ResBlock(24, 16, ctx_channels=8, groups=8), std=0.2).eval()
    a, b = (torch.randn(2, c, 20, 12).contiguous(memory_format=torch.channels_last) for c in (8, 16))
    ctx = torch.randn(2, 8, 5, 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = block(torch.cat([a, b], dim=1), ctx)  # groups of 3 channels straddle the two parts
        parts = [a, b]
        out = block.lean(parts, ctx, stripe_rows=3, reuse=b)
    assert parts == [] and out.data_ptr() == b.data_ptr()
    _assert_same(out, expected)


@pytest.mark.parametrize("rows", [(0, 8), (0, 16), (3, 11), (1, 2), (15, 16), (7, 7 + 1)])
def test_upsampled_rows_match_upsample_then_conv(rows):
    """Sub-pixel form of nearest x2 + 3x3 conv: four 2x2 kernels on the low map, any rows of the output."""
    from dcssdae.decoder_lean import _Upsampled

    torch.manual_seed(0)
    up = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2.0), torch.nn.Conv2d(6, 5, 3, padding=1))
    low = torch.randn(2, 6, 8, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = rows
        _assert_same(_Upsampled(low, up).rows(a, b), up(low)[:, :, a:b])


@pytest.mark.parametrize("chunk_tiles,grid", [(1, (19, 10)), (3, (20, 24)), (2, (9, 9))])
def test_blocked_attention_in_chunks_matches_dense(monkeypatch, chunk_tiles, grid):
    from dcssdae import decoder_layers

    monkeypatch.setattr(decoder_layers, "CHUNK_TILES", chunk_tiles)
    _assert_blocked_matches_dense(5, grid)


def test_feed_forward_in_chunks_without_autograd(monkeypatch):
    from dcssdae import decoder_layers

    ff = _randomize_(decoder_layers.GEGLU(16, mult=2), std=0.5)
    x = torch.randn(2, 50, 16)
    expected = ff(x)  # autograd on: one call
    monkeypatch.setattr(decoder_layers, "FF_CHUNK_TOKENS", 7)
    with torch.no_grad():
        _assert_same(ff(x), expected)
