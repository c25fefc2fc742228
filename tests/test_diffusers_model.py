"""Tests of dcssdae.diffusers_model.AutoencoderDCSSD: diffusers interface, formats, and a real diffusers pipeline."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from dcssdae.autoencoder import DCSSDAE
from dcssdae.diffusers_model import AutoencoderDCSSD
from dcssdae.export import write_export
from dcssdae.latent_stats import main_latent_stats


def tiny_dcssdae(seed: int = 0, **kwargs) -> DCSSDAE:
    """Tiny DCSSDAE (f8, c4) with every weight perturbed, so outputs depend on all of them."""
    torch.manual_seed(seed)
    model = DCSSDAE("tiny-f8c4", "tiny", sampler={"method": "gd", "steps": 2}, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


def decode(vae: AutoencoderDCSSD, z: torch.Tensor, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z, generator=torch.Generator().manual_seed(seed)).sample


def test_encode_decode_follow_diffusers_types_and_raw_latents():
    model = tiny_dcssdae(latent_scale=2.5, latent_shift=0.1)
    vae = AutoencoderDCSSD.from_dcssdae(model)
    assert vae.config.scaling_factor == 2.5 and vae.config.shift_factor == 0.1 and vae.config.latent_channels == 4
    assert vae.spatial_compression_ratio == 8
    x = images()
    with torch.no_grad():
        out = vae.encode(x)
        (z,) = vae.encode(x, return_dict=False)
        raw = model.encoder(x).mode()
    assert type(out).__name__ == "EncoderOutput" and torch.equal(out.latent, z)
    torch.testing.assert_close(z, raw)  # raw latent: the pipeline applies scaling_factor, not the model
    # decode(raw z) = DCSSDAE.decode(scaled z) with the same noise
    x_hat = decode(vae, z)
    with torch.no_grad():
        (again,) = vae.decode(z, return_dict=False, generator=torch.Generator().manual_seed(0))
        expected = model.decode((z - 0.1) * 2.5, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and torch.equal(x_hat, again)
    torch.testing.assert_close(x_hat, expected, rtol=1e-4, atol=1e-5)
    # sampler settings pass through: one step differs from the configured two
    with torch.no_grad():
        one = vae.decode(z, steps=1, generator=torch.Generator().manual_seed(0)).sample
    assert not torch.allclose(one, x_hat)


def test_slicing_and_tiling_switches():
    vae = AutoencoderDCSSD.from_dcssdae(tiny_dcssdae())
    x = images(2, 32)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode(x).latent
        batched = vae.decode(z, noise=noise, steps=1).sample
        vae.enable_slicing()
        z_sliced = vae.encode(x).latent
        sliced = vae.decode(z, noise=noise, steps=1).sample
        vae.disable_slicing()
        vae.enable_tiling(tile=16, overlap=8)
        assert vae.use_tiling and vae.ae.tiling is not None
        tiled = vae.decode(z, noise=noise, steps=1).sample
        vae.disable_tiling()
    assert not vae.use_tiling and vae.ae.tiling is None
    torch.testing.assert_close(z_sliced, z, rtol=1e-3, atol=1e-4)  # batch size changes the float summation order
    torch.testing.assert_close(sliced, batched, rtol=1e-3, atol=1e-4)
    assert tiled.shape == batched.shape and not torch.equal(tiled, batched)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    vae = AutoencoderDCSSD.from_dcssdae(tiny_dcssdae(latent_scale=0.7))
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.safetensors"]
    loaded = AutoencoderDCSSD.from_pretrained(tmp_path / "vae")
    assert not loaded.training and loaded.config.scaling_factor == 0.7
    x = images()
    with torch.no_grad():
        z, z2 = vae.encode(x).latent, loaded.encode(x).latent
    assert torch.equal(z, z2) and torch.equal(decode(vae, z), decode(loaded, z))


def test_export_to_diffusers_to_export_keeps_weights_bit_identical(tmp_path):
    model = tiny_dcssdae(latent_scale=1.3, latent_shift=-0.2)
    write_export(model, tmp_path / "export")
    vae = AutoencoderDCSSD.from_pretrained(tmp_path / "export")
    vae.save_pretrained(tmp_path / "diffusers")
    back = AutoencoderDCSSD.from_pretrained(tmp_path / "diffusers").to_dcssdae()
    write_export(back, tmp_path / "export2")
    a, b = load_file(tmp_path / "export" / "model.safetensors"), load_file(tmp_path / "export2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    config_a = json.loads((tmp_path / "export" / "config.json").read_text())
    config_b = json.loads((tmp_path / "export2" / "config.json").read_text())
    config_a.pop("export"), config_b.pop("export")
    assert config_a == config_b


def test_from_pretrained_reads_checkpoints_subfolders_and_casts(tmp_path):
    model = tiny_dcssdae()
    state = {f"ae.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "dcssdae_config": model.config(), "global_step": 1}, tmp_path / "run.ckpt")
    from_ckpt = AutoencoderDCSSD.from_pretrained(tmp_path / "run.ckpt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in from_ckpt.state_dict().items())
    from_ckpt.save_pretrained(tmp_path / "repo" / "vae")
    half = AutoencoderDCSSD.from_pretrained(tmp_path / "repo", subfolder="vae", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    write_export(model, tmp_path / "repo" / "export")
    assert AutoencoderDCSSD.from_pretrained(tmp_path / "repo", subfolder="export",
                                            torch_dtype=torch.float16).dtype == torch.float16
    x = images(1)
    with torch.no_grad():
        z = half.encode(x).latent
        x_hat = half.decode(z, steps=1).sample
    assert z.dtype == torch.bfloat16 and x_hat.dtype == torch.bfloat16
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a dcssdae export"):
        AutoencoderDCSSD.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderDCSSD(encoder="tiny-f8c4", decoder="tiny", latent_channels=8)


def test_latent_stats_give_the_pipeline_scaling_factor(tmp_path):
    import numpy as np
    from PIL import Image

    model = tiny_dcssdae()
    write_export(model, tmp_path / "export")
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png")
    assert main_latent_stats([str(tmp_path / "export"), "--data", str(tmp_path / "images"), "--size", "32"]) == 0
    vae = AutoencoderDCSSD.from_pretrained(tmp_path / "export")
    x = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "images" / f"{i}.png"))).permute(2, 0, 1)
                     for i in range(3)]).float() / 127.5 - 1
    with torch.no_grad():
        scaled = vae.encode(x).latent.double() * vae.config.scaling_factor  # what a pipeline does
    assert scaled.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


def test_dit_pipeline_runs_end_to_end_with_it_as_vae():
    """A real diffusers pipeline (class-conditional DiT, tiny random transformer) decodes through AutoencoderDCSSD:
    latents of 8 x 8 x c4 become 64 x 64 images, and the pipeline divides by config.scaling_factor first."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, norm_num_groups=4,
                                        num_embeds_ada_norm=1000).eval()
    vae = AutoencoderDCSSD.from_dcssdae(tiny_dcssdae(latent_scale=4.0))
    seen = []
    decode_fn = vae.decode
    vae.decode = lambda z, *a, **k: seen.append(z.clone()) or decode_fn(z, *a, **k)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    images_out = out.images
    assert images_out.shape == (2, 3, 64, 64) and images_out.min() >= 0 and images_out.max() <= 1
    assert len(seen) == 1 and seen[0].shape == (2, 4, 8, 8)
    # half-precision pipeline: transformer and vae in bf16
    pipe.to(torch.bfloat16)
    half = pipe(class_labels=[1], num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    assert half.shape == (1, 3, 64, 64) and torch.isfinite(half).all()
