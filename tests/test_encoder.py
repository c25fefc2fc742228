"""Encoders: registry, shapes, posterior maths, numerics at init, and pretrained-weight loading.

Parity with diffusers is checked on small random `AutoencoderDC` / `AutoencoderKL` configurations (no pretrained
weights exist offline). The MIT (efficientvit) and LDM key formats are checked by renaming a diffusers state dict in
this file and asserting that diffusers' own converters (`convert_autoencoder_dc_checkpoint_to_diffusers`,
`convert_ldm_vae_checkpoint`) map it back to the original: so our MIT/LDM naming is verified against diffusers'
reading of those formats, not against a real MIT or LDM file.
"""

import re

import pytest
import torch

from dcssdae.encoders import ENCODERS, LiteMLA, Posterior, build_encoder
from dcssdae.encoders.weights import DC_KEYS, KL_KEYS, LOGVAR_FILL, _pattern, load_encoder_weights

diffusers = pytest.importorskip("diffusers")

TINY = ["tiny-f32c8", "tiny-f8c4", "tiny-vq_f8c4"]
FULL_SIZE = ["dc-ae-f32c32-in-1.0", "dc-ae-f64c128-in-1.0", "dc-ae-f128c512-in-1.0", "dc-ae-1.5-f32c32",
             "dc-ae-1.5-f64c128", "dc-ae-1.5-f128c512", "vq_f8c4"]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Registry and construction


def test_registry_has_the_named_variants():
    assert set(TINY + FULL_SIZE) <= set(ENCODERS)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown encoder 'dc-ae-f16'.*dc-ae-f32c32-in-1.0"):
        build_encoder("dc-ae-f16")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['widht'\]"):
        build_encoder("tiny-f8c4", widht=3)
    with pytest.raises(ValueError, match="divisible by latent_channels"):
        build_encoder("tiny-f8c4", latent_channels=5)
    with pytest.raises(ValueError, match="unknown block types"):
        build_encoder("tiny-f8c4", block_types=("ResBlock", "ResBlock", "Swin", "EViT"))


# Exact counts, built on the meta device (no memory, instant). dc-ae-f32c32-in-1.0 = 123.17 M is diffusers
# AutoencoderDC's encoder (checked against diffusers itself below); vq_f8c4 = SD-VAE encoder + quant_conv.
PARAMS = {
    "dc-ae-f32c32-in-1.0": 123_172_384,
    "dc-ae-f64c128-in-1.0": 264_550_528,
    "dc-ae-f128c512-in-1.0": 415_661_056,
    "dc-ae-1.5-f32c32": 228_019_520,
    "dc-ae-1.5-f64c128": 307_658_496,
    "dc-ae-1.5-f128c512": 392_606_464,
    "vq_f8c4": 34_163_664,
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_parameter_counts(name):
    with torch.device("meta"):
        encoder = build_encoder(name)
    assert n_params(encoder) == PARAMS[name]


def test_parameter_counts_match_diffusers():
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    with torch.device("meta"):
        dc = diffusers.AutoencoderDC(
            latent_channels=32, attention_head_dim=32, encoder_block_types=blocks, decoder_block_types=blocks,
            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            encoder_layers_per_block=(0, 4, 8, 2, 2, 2), decoder_layers_per_block=(0, 5, 10, 2, 2, 2),
            encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
            downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle")
        kl = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4,
                                     block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    assert n_params(dc.encoder) == PARAMS["dc-ae-f32c32-in-1.0"]
    assert n_params(kl.encoder) + n_params(kl.quant_conv) == PARAMS["vq_f8c4"]


# ---------------------------------------------------------------------------------------------------------------
# Shapes, input checks


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(32, 32), (64, 96)])
def test_latent_shape(name, size):
    encoder = build_encoder(name)
    f, c = encoder.downsample_factor, encoder.latent_channels
    posterior = encoder(torch.randn(2, 3, *size))
    assert posterior.mean.shape == (2, c, size[0] // f, size[1] // f)
    assert posterior.sample().shape == posterior.mean.shape
    assert posterior.kl().shape == (2,)


def test_attributes():
    assert (build_encoder("tiny-f32c8").downsample_factor, build_encoder("tiny-f32c8").latent_channels) == (32, 8)
    assert build_encoder("tiny-f8c4").downsample_factor == 8
    assert build_encoder("tiny-vq_f8c4").downsample_factor == 8
    assert build_encoder("tiny-f32c8", double_latent=False)(torch.randn(1, 3, 32, 32)).logvar is None


@pytest.mark.parametrize("name", ["tiny-f32c8", "tiny-vq_f8c4"])
def test_bad_inputs_raise_clear_errors(name):
    encoder = build_encoder(name)
    f = encoder.downsample_factor
    with pytest.raises(ValueError, match=rf"image size {f + f // 2}x{2 * f} is not divisible by the downsample factor {f}"):
        encoder(torch.randn(1, 3, f + f // 2, 2 * f))
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        encoder(torch.randn(1, 4, f, f))
    with pytest.raises(ValueError, match=r"expected an image batch \(B, C, H, W\)"):
        encoder(torch.randn(3, f, f))


def test_channels_last_gives_the_same_latent():
    encoder = build_encoder("tiny-f32c8").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = encoder(x).mean
        out = encoder.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last)).mean
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Posterior


def test_posterior_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(Posterior(mean, logvar).kl(), expected, atol=1e-4, rtol=1e-5)


def test_posterior_sampling_and_determinism():
    mean, logvar = torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), -2.0)
    posterior = Posterior(mean, logvar)
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, posterior.sample())
    assert torch.equal(posterior.mode(), mean)
    std = ((a - mean) / posterior.std).std()
    assert 0.8 < std < 1.2
    deterministic = Posterior(mean)
    assert torch.equal(deterministic.sample(), mean) and torch.equal(deterministic.kl(), torch.zeros(2))


def test_posterior_clamps_logvar():
    posterior = Posterior(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-1e4, 1e4]]]]))
    assert posterior.logvar.tolist() == [[[[-30.0, 20.0]]]]
    assert torch.isfinite(posterior.kl()).all() and torch.isfinite(posterior.sample()).all()


# ---------------------------------------------------------------------------------------------------------------
# LiteMLA: both attention paths compute the same normalised ReLU attention as a direct reference.


@pytest.mark.parametrize("size", [(4, 4), (8, 8)])  # N = 16 <= d = 16: quadratic path; N = 64: linear path
def test_lite_mla_matches_reference(size):
    attn = LiteMLA(32, head_dim=16)
    qkv = torch.randn(2, 96, *size)
    q, k, v = qkv.reshape(2, 2, 48, -1).split(16, dim=2)  # heads laid out as [q_h | k_h | v_h]
    scores = torch.einsum("bhdm,bhdn->bhmn", k.relu(), q.relu())  # (B, h, N_k, N_q)
    expected = torch.einsum("bhdm,bhmn->bhdn", v, scores / (scores.sum(2, keepdim=True) + 1e-15))
    torch.testing.assert_close(attn.attention(qkv), expected.reshape(2, 32, *size), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Numerics at init: sane latent scale, finite bf16 gradients reaching every parameter.


@pytest.mark.parametrize("name", TINY)
def test_init_scale(name):
    torch.manual_seed(0)
    posterior = build_encoder(name)(torch.randn(4, 3, 64, 64))
    assert torch.isfinite(posterior.mean).all()
    assert 0.05 < posterior.mean.std() < 10
    assert posterior.mean.abs().max() < 100
    assert torch.isfinite(posterior.kl()).all()


def test_full_size_dc_ae_at_64px():
    torch.manual_seed(0)
    encoder = build_encoder("dc-ae-f32c32-in-1.0").eval()
    with torch.no_grad():
        z = encoder(torch.randn(1, 3, 64, 64)).mean
    assert z.shape == (1, 32, 2, 2)
    assert torch.isfinite(z).all() and 0.1 < z.std() < 10


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FULL_SIZE if n != "dc-ae-f32c32-in-1.0"])
def test_full_size_init_scale(name):
    torch.manual_seed(0)
    encoder = build_encoder(name).eval()
    size = max(64, encoder.downsample_factor)
    with torch.no_grad():
        posterior = encoder(torch.randn(2, 3, size, size))
    assert torch.isfinite(posterior.mean).all() and 0.05 < posterior.mean.std() < 10
    assert posterior.logvar is None or torch.isfinite(posterior.kl()).all()


@pytest.mark.parametrize("name", ["tiny-f32c8", "tiny-vq_f8c4"])  # bf16 convs are slow on CPU: two presets
def test_bf16_autocast_backward(name):
    torch.manual_seed(0)
    encoder = build_encoder(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = encoder(torch.randn(2, 3, 32, 32))
        loss = posterior.sample().square().mean() + 1e-3 * posterior.kl().mean()
    loss.backward()
    for pname, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets no gradient"


# ---------------------------------------------------------------------------------------------------------------
# Pretrained weights: diffusers parity, MIT and LDM formats, errors.

DC_BLOCKS = ("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock")
DC_OVERRIDES = {"latent_channels": 8, "widths": (16, 16, 32, 32), "depths": (0, 1, 2, 1)}  # on top of tiny-f8c4


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at (1, 0): perturb them so a swapped weight/bias would show
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def diffusers_dc(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderDC(
        latent_channels=8, attention_head_dim=8, encoder_block_types=DC_BLOCKS, decoder_block_types=DC_BLOCKS,
        encoder_block_out_channels=(16, 16, 32, 32), decoder_block_out_channels=(16, 16, 32, 32),
        encoder_layers_per_block=(0, 1, 2, 1), decoder_layers_per_block=(0, 1, 1, 1),
        encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
        decoder_norm_types=("batch_norm",) * 2 + ("rms_norm",) * 2, decoder_act_fns=("relu",) * 2 + ("silu",) * 2,
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle").eval()
    _randomise_norms(model)
    folder = tmp_path_factory.mktemp("dc") / "diffusers"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def diffusers_kl(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                                    layers_per_block=1, norm_num_groups=8, latent_channels=4).eval()
    _randomise_norms(model)
    folder = tmp_path_factory.mktemp("kl") / "diffusers"
    model.save_pretrained(folder)
    return model, folder


def _dc_reference(model, x):
    with torch.no_grad():
        return model.encode(x).latent


@pytest.mark.parametrize("size", [(32, 48), (8, 8)])  # (8, 8): 1x1 latent, quadratic attention path
def test_diffusers_dc_parity(diffusers_dc, size):
    model, folder = diffusers_dc
    encoder = build_encoder("tiny-f8c4", pretrained=str(folder), double_latent=False, **DC_OVERRIDES).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        z = encoder(x).mean
    assert (z - _dc_reference(model, x)).abs().max() < 1e-4


def test_deterministic_checkpoint_into_gaussian_encoder(diffusers_dc):
    model, folder = diffusers_dc
    encoder = build_encoder("tiny-f8c4", **DC_OVERRIDES).eval()  # tiny-f8c4 is Gaussian (double_latent=True)
    report = load_encoder_weights(encoder, folder)
    assert report["format"] == "diffusers" and report["filled"] == ["project_logvar.weight", "project_logvar.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        posterior = encoder(x)
    assert (posterior.mean - _dc_reference(model, x)).abs().max() < 1e-4
    assert torch.equal(posterior.logvar, torch.full_like(posterior.logvar, LOGVAR_FILL))


@pytest.mark.parametrize("legacy", [False, True])  # True: diffusers < 0.14 attention names (query, ..., proj_attn)
def test_diffusers_kl_parity(diffusers_kl, tmp_path, legacy):
    from safetensors.torch import load_file, save_file

    model, folder = diffusers_kl
    if legacy:
        renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state = load_file(folder / "diffusion_pytorch_model.safetensors")
        state = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{renames[m[1]]}.", k): v
                 for k, v in state.items()}
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
        save_file(state, tmp_path / "vae.safetensors")
        folder = tmp_path / "vae.safetensors"
    encoder = build_encoder("tiny-vq_f8c4", pretrained=str(folder), channel_mult=(1, 2, 2, 2)).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        ref = model.encode(x).latent_dist
        posterior = encoder(x)
    assert (posterior.mean - ref.mean).abs().max() < 1e-4
    assert (posterior.logvar - ref.logvar).abs().max() < 1e-4


# dc-ae-f32c32-in-1.0 twice: DC-AE 1.0 (stage 0 empty, project_in downsamples) and with a stage-0 block (plain conv).
@pytest.mark.parametrize("table, name, overrides", [
    (DC_KEYS, "dc-ae-f32c32-in-1.0", [{}, {"depths": (1, 4, 8, 2, 2, 2)}]),
    (KL_KEYS, "vq_f8c4", [{}]),
], ids=["dc", "kl"])
def test_key_tables_cover_the_full_size_encoders(table, name, overrides):
    """Every row of a key table names a tensor of ours, and each format maps onto every tensor (this also checks the
    targets of rows the tiny parity configurations never reach)."""
    targets = [_pattern(ours.split("#")[0]) for ours, *_ in table]
    with torch.device("meta"):
        key_sets = [set(build_encoder(name, **o).state_dict()) for o in overrides]
    for row, target in zip(table, targets):
        assert any(target.fullmatch(k) for keys in key_sets for k in keys), f"{row[0]} names no tensor of {name}"
    for keys in key_sets:
        for column in (1, 2):
            covered = {k for row, target in zip(table, targets) if row[column] for k in keys if target.fullmatch(k)}
            assert covered == keys, f"format column {column} misses {sorted(keys - covered)[:5]}"


def _diffusers_dc_to_mit(state):
    """Rename a diffusers AutoencoderDC encoder state dict to the MIT efficientvit names (written for this test)."""
    rules = [
        (r"encoder\.conv_in\.conv\.(.*)", r"encoder.project_in.conv.conv.\1"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.(conv1|conv2)\.(.*)", r"encoder.stages.\1.op_list.\2.main.\3.conv.\4"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.norm\.(.*)", r"encoder.stages.\1.op_list.\2.main.conv2.norm.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.attn\.to_out\.weight",
         r"encoder.stages.\1.op_list.\2.context_module.main.proj.conv.weight"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.attn\.norm_out\.(.*)",
         r"encoder.stages.\1.op_list.\2.context_module.main.proj.norm.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_inverted\.(.*)",
         r"encoder.stages.\1.op_list.\2.local_module.main.inverted_conv.conv.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_depth\.(.*)",
         r"encoder.stages.\1.op_list.\2.local_module.main.depth_conv.conv.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.conv_out\.conv_point\.(.*)",
         r"encoder.stages.\1.op_list.\2.local_module.main.point_conv.conv.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.conv_out\.norm\.(.*)",
         r"encoder.stages.\1.op_list.\2.local_module.main.point_conv.norm.\3"),
        (r"encoder\.down_blocks\.(\d+)\.(\d+)\.conv\.(.*)", r"encoder.stages.\1.op_list.\2.main.conv.conv.\3"),
        (r"encoder\.conv_out\.(.*)", r"encoder.project_out.main.op_list.0.conv.\1"),
    ]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(\d+)\.attn\.to_q\.weight", key)
        if m:  # q, k, v linears -> one 1x1 qkv conv
            prefix = key[: -len("to_q.weight")]
            qkv = torch.cat([state[prefix + f"to_{n}.weight"] for n in "qkv"])[..., None, None]
            out[f"encoder.stages.{m[1]}.op_list.{m[2]}.context_module.main.qkv.conv.weight"] = qkv
            continue
        if re.search(r"attn\.to_[kv]\.weight", key):
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, replacement, key)
                out[new] = value[..., None, None] if new.endswith("proj.conv.weight") else value
                break
        else:
            raise AssertionError(f"test mapping misses {key}")
    return out


@pytest.fixture(scope="module")
def mit_state(diffusers_dc):
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    model, _ = diffusers_dc
    reference = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    mit = _diffusers_dc_to_mit(reference)
    # Independent check of our MIT naming: diffusers' own MIT -> diffusers converter gives the original back.
    back = convert_autoencoder_dc_checkpoint_to_diffusers(dict(mit))
    assert set(back) == set(reference)
    assert all(torch.equal(back[k].reshape(reference[k].shape), reference[k]) for k in reference)
    return mit


@pytest.mark.parametrize("container", ["model.safetensors", "ckpt.pt"])
def test_mit_format(diffusers_dc, mit_state, tmp_path, container):
    from safetensors.torch import save_file

    model, _ = diffusers_dc
    decoder_key = {"decoder.project_in.conv.weight": torch.zeros(1)}  # decoder keys are ignored
    if container.endswith(".safetensors"):  # the HF repo layout: a flat DCAE state dict
        save_file({**mit_state, **decoder_key}, tmp_path / container)
        path = tmp_path  # a folder holding model.safetensors
    else:  # an efficientvit training checkpoint: {"state_dict": ...}
        torch.save({"state_dict": {**mit_state, **decoder_key}}, tmp_path / container)
        path = tmp_path / container
    encoder = build_encoder("tiny-f8c4", double_latent=False, **DC_OVERRIDES).eval()
    assert load_encoder_weights(encoder, path)["format"] == "mit-dc-ae"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = encoder(x).mean
    assert (z - _dc_reference(model, x)).abs().max() < 1e-4


def test_ldm_format(diffusers_kl, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    model, _ = diffusers_kl
    reference = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    renames = [("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
               ("mid_block.attentions.0", "mid.attn_1"), ("down_blocks.", "down."), (".resnets.", ".block."),
               ("conv_shortcut", "nin_shortcut"), ("downsamplers.0", "downsample"),
               ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
               ("conv_norm_out", "norm_out")]
    ldm = {}
    for key, value in reference.items():
        for old, new in renames:
            key = key.replace(old, new)
        ldm["first_stage_model." + key] = value[..., None, None] if ".attn_1." in key and value.ndim == 2 else value
    config = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    back = convert_ldm_vae_checkpoint(dict(ldm), config)  # diffusers' reading of the LDM names
    assert set(back) == set(reference) and all(torch.equal(back[k], reference[k]) for k in reference)

    save_file(ldm, tmp_path / "sd.safetensors")
    encoder = build_encoder("tiny-vq_f8c4", channel_mult=(1, 2, 2, 2)).eval()
    assert load_encoder_weights(encoder, tmp_path / "sd.safetensors")["format"] == "ldm"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (encoder(x).mean - model.encode(x).latent_dist.mean).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-f32c8", "tiny-vq_f8c4"])
def test_own_format_roundtrip(name, tmp_path):
    from safetensors.torch import save_file

    source = build_encoder(name).eval()
    save_file({"encoder." + k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    target = build_encoder(name, pretrained=str(tmp_path / "w.safetensors")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x).mean, source(x).mean)


def test_shape_mismatch_names_the_tensors(diffusers_dc):
    _, folder = diffusers_dc
    with pytest.raises(ValueError, match=r"(?s)8 shape mismatches:\n.*project_in\.conv\.weight: checkpoint \(4, 3, 3, 3\)"
                                         r" vs model \(8, 3, 3, 3\)"):
        build_encoder("tiny-f8c4", pretrained=str(folder), latent_channels=8, widths=(32, 32, 32, 32),
                      depths=(0, 1, 2, 1))


def test_missing_and_unexpected_keys_are_named(diffusers_dc, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = diffusers_dc
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["encoder.down_blocks.1.0.conv1.bias"]
    state["encoder.down_blocks.3.0.attn.to_qkv_multiscale.0.proj_in.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError) as info:
        build_encoder("tiny-f8c4", pretrained=str(tmp_path / "broken.safetensors"), **DC_OVERRIDES)
    message = str(info.value)
    assert "missing keys:\n    stages.1.blocks.0.conv1.bias" in message
    assert "unexpected keys:\n    down_blocks.3.0.attn.to_qkv_multiscale.0.proj_in.weight (no mapping)" in message


def test_missing_file_and_wrong_class(diffusers_kl, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/dc-ae"):
        build_encoder("tiny-f8c4", pretrained=str(tmp_path / "nowhere" / "dc-ae"))
    _, folder = diffusers_kl
    with pytest.raises(ValueError, match="config.json is a AutoencoderKL"):
        build_encoder("tiny-f8c4", pretrained=str(folder))
