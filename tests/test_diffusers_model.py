"""Tests of dcssdae.diffusers_model.AutoencoderDCSSD: diffusers interface, loading and saving paths (with and without
accelerate), dtypes, generators, gradient checkpointing, and a real diffusers pipeline.

Every model here has all its weights perturbed: at default initialisation the decoder's last convolution and
residual branches are zero, so its output would be identically 0 whatever the input and the tests would pass
vacuously (`test_outputs_depend_on_inputs_and_weights` checks that ours do not).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from dcssdae.autoencoder import DCSSDAE
from dcssdae.diffusers_model import AutoencoderDCSSD
from dcssdae.export import write_export
from dcssdae.latent_stats import main_latent_stats


def tiny_dcssdae(seed: int = 0, encoder: str = "tiny-f8c4", **kwargs) -> DCSSDAE:
    """Tiny DCSSDAE (f8, c4) with every weight perturbed, so outputs depend on all of them."""
    torch.manual_seed(seed)
    model = DCSSDAE(encoder, "tiny", sampler={"method": "gd", "steps": 2}, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_vae(seed: int = 0, **kwargs) -> AutoencoderDCSSD:
    return AutoencoderDCSSD.from_dcssdae(tiny_dcssdae(seed, **kwargs))


def images(n: int = 2, size: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def decode(vae: AutoencoderDCSSD, z: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z, generator=torch.Generator().manual_seed(seed), **kwargs).sample


def encode(vae: AutoencoderDCSSD, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(x).latent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=["accelerate", "no-accelerate"])
def accelerate(request, monkeypatch):
    """Run a test with accelerate (diffusers then loads with low_cpu_mem_usage=True) and as if it were missing."""
    if request.param == "accelerate":
        pytest.importorskip("accelerate")
        return True
    from diffusers.models import modeling_utils
    from diffusers.pipelines import pipeline_utils

    for module in (modeling_utils, pipeline_utils):
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False)
        monkeypatch.setattr(module, "_LOW_CPU_MEM_USAGE_DEFAULT", False)
    return False


# ----------------------------------------------------------------------------------------------------------------
# The interface


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
    assert not torch.allclose(decode(vae, z, steps=1), x_hat)


def test_outputs_depend_on_inputs_and_weights():
    """Determinism given the generator, and outputs that change with the input, the noise and the weights (a model
    at default initialisation decodes every latent to exactly 0)."""
    vae, other = tiny_vae(0), tiny_vae(1)
    x = images()
    z = encode(vae, x)
    x_hat = decode(vae, z)
    assert x_hat.abs().mean() > 1e-3 and torch.equal(x_hat, decode(vae, z))
    assert not torch.allclose(z, encode(vae, images(seed=6)))
    assert not torch.allclose(x_hat, decode(vae, z.flip(0)).flip(0))  # another latent
    assert not torch.allclose(x_hat, decode(vae, z, seed=1))  # other noise
    assert not torch.allclose(x_hat, decode(other, z))  # other weights
    fresh = AutoencoderDCSSD(encoder_preset="tiny-f8c4", decoder_preset="tiny").eval()
    assert decode(fresh, z, steps=2).abs().max() == 0  # what the perturbation avoids


def test_config_keys_do_not_shadow_the_networks_and_old_configs_load(tmp_path):
    vae = tiny_vae()
    assert isinstance(vae.encoder, torch.nn.Module) and isinstance(vae.decoder, torch.nn.Module)
    assert vae.get_submodule("encoder.project_out") is vae.encoder.project_out
    assert vae.config.encoder_preset == "tiny-f8c4" and vae.config.decoder_preset == "tiny"
    vae.save_pretrained(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["encoder"], config["decoder"] = config.pop("encoder_preset"), config.pop("decoder_preset")
    config_file.write_text(json.dumps(config))  # as saved by the previous version
    old = AutoencoderDCSSD.from_pretrained(tmp_path / "vae")
    assert old.config.encoder_preset == "tiny-f8c4" and "encoder" not in old.config
    assert isinstance(old.encoder, torch.nn.Module)
    x = images()
    z = encode(vae, x)
    assert torch.equal(encode(old, x), z) and torch.equal(decode(old, z), decode(vae, z))
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderDCSSD(encoder_preset="tiny-f8c4", decoder_preset="tiny", latent_channels=8)


def test_slicing_gives_the_batch_result_and_tiling_cuts_tiles():
    vae = tiny_vae()
    x = images(2, 32)
    z = encode(vae, x)
    batched = decode(vae, z)
    vae.enable_slicing()
    z_sliced, sliced = encode(vae, x), decode(vae, z)  # same generator: the noise is drawn for the whole batch
    vae.disable_slicing()
    torch.testing.assert_close(z_sliced, z, rtol=1e-3, atol=1e-4)  # batch size changes the float summation order
    torch.testing.assert_close(sliced, batched, rtol=1e-3, atol=1e-4)

    seen = {"encoder": [], "decoder": []}
    hooks = [getattr(vae, name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(
        tuple(args[0].shape[-2:]))) for name in seen]
    vae.enable_tiling(tile=16, overlap=8)
    assert vae.use_tiling and vae.ae.tiling is not None
    z_tiled, tiled = encode(vae, x), decode(vae, z)
    vae.disable_tiling()
    for hook in hooks:
        hook.remove()
    assert not vae.use_tiling and vae.ae.tiling is None
    # 32 px with 16 px tiles and 8 px overlap: 3 x 3 tiles per call, 2 sampler steps
    assert seen["encoder"] == [(16, 16)] * 9 and seen["decoder"] == [(16, 16)] * 18
    assert tiled.shape == batched.shape and not torch.equal(tiled, batched)
    assert z_tiled.shape == z.shape and not torch.equal(z_tiled, z)
    # each tile sees only its pixels (random weights: only a loose bound, see test_tiling.py)
    assert rel_err(tiled, batched) < 1 and rel_err(z_tiled, z) < 1


def test_per_sample_generators():
    """A list of generators gives each sample its own noise: sample i is what decoding it alone with generator i
    gives; the same for posterior samples in encode."""
    vae = tiny_vae()
    x = images(2)
    z = encode(vae, x)
    with torch.no_grad():
        both = vae.decode(z, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).sample
        z_both = vae.encode(x, sample_posterior=True,
                            generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).latent
        for i, seed in enumerate((3, 4)):
            alone = vae.decode(z[i:i + 1], generator=torch.Generator().manual_seed(seed)).sample
            torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-5)
            z_alone = vae.encode(x[i:i + 1], sample_posterior=True, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(z_both[i:i + 1], z_alone.latent, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(z_both, z)  # a sample, not the mean
        with pytest.raises(ValueError, match="3 generators for a batch of 2"):
            vae.decode(z, generator=[torch.Generator() for _ in range(3)])


@pytest.mark.gpu
def test_cpu_generator_with_a_model_on_the_gpu():
    """The noise is drawn on the CPU generator and moved (diffusers' randn_tensor): the same image as on the CPU."""
    vae = tiny_vae()
    z = encode(vae, images(2))
    on_cpu = decode(vae, z, steps=1)
    on_gpu = decode(vae.to("cuda"), z.cuda(), steps=1)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_reload_decode_gives_the_same_images(tmp_path, accelerate):
    """Every diffusers loading path of a save_pretrained folder: default (low_cpu_mem_usage with accelerate),
    low_cpu_mem_usage=False, device_map (accelerate only, diffusers' requirement), sharded weights."""
    vae = tiny_vae(latent_scale=0.7)
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.safetensors"]
    vae.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    sharded = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in sharded and len(sharded) > 3
    x = images()
    z = encode(vae, x)
    x_hat = decode(vae, z)
    loads = [("vae", {}), ("vae", {"low_cpu_mem_usage": False}), ("sharded", {})]
    if accelerate:
        loads += [("vae", {"device_map": "cpu"}), ("sharded", {"device_map": "auto"})]
    else:
        with pytest.raises(NotImplementedError, match="accelerate"):  # diffusers' own requirement
            AutoencoderDCSSD.from_pretrained(tmp_path / "vae", device_map="cpu")
    for folder, options in loads:
        loaded = AutoencoderDCSSD.from_pretrained(tmp_path / folder, **options)
        assert not loaded.training and loaded.config.scaling_factor == 0.7, (folder, options)
        assert isinstance(loaded.encoder, torch.nn.Module)
        assert torch.equal(encode(loaded, x), z) and torch.equal(decode(loaded, z), x_hat), (folder, options)


def test_dit_pipeline_from_pretrained_of_a_saved_pipeline(tmp_path):
    """A real diffusers pipeline (class-conditional DiT, tiny random transformer) decodes through AutoencoderDCSSD
    (latents of 8 x 8 x c4 become 64 x 64 images, divided by config.scaling_factor first); saved and loaded back with
    DiTPipeline.from_pretrained, in float32 and in bfloat16, it gives the same images."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, norm_num_groups=4,
                                        num_embeds_ada_norm=1000).eval()
    vae = tiny_vae(latent_scale=4.0)
    seen = []
    decode_fn = vae.decode
    vae.decode = lambda z, *a, **k: seen.append(z.clone()) or decode_fn(z, *a, **k)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(5)  # DiTPipeline decodes without a generator: the decoder's noise comes from the global RNG
        return pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    images_out = run(pipe)
    assert images_out.shape == (2, 3, 64, 64) and images_out.min() >= 0 and images_out.max() <= 1
    assert images_out.std() > 0.01
    assert len(seen) == 1 and seen[0].shape == (2, 4, 8, 8)
    del vae.decode
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.vae) is AutoencoderDCSSD and loaded.vae.config.scaling_factor == 4.0
    assert torch.equal(run(loaded), images_out)
    half = DiTPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    assert half.vae.dtype == torch.bfloat16
    half_images = run(half)
    assert torch.isfinite(half_images).all() and (half_images - images_out).abs().max() < 0.2


def test_save_keeps_unrelated_files_and_variants_sit_side_by_side(tmp_path):
    """save_pretrained writes its own files only: unrelated files and folders survive, an fp16 variant saved after
    the float32 weights leaves both loadable, a non-main process writes no config, and an older save's stale shards
    and index (which diffusers would load instead) go."""
    vae = tiny_vae()
    folder = tmp_path / "repo"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "run.txt").write_text("kept")
    (folder / "README.md").write_text("my model")
    vae.save_pretrained(folder, max_shard_size="200KB")  # sharded first: the plain save below replaces it
    vae.save_pretrained(folder)
    half = AutoencoderDCSSD.from_dcssdae(tiny_dcssdae(seed=1).half())  # other weights: shows which file was read
    half.save_pretrained(folder, variant="fp16")
    assert (folder / "notes" / "run.txt").read_text() == "kept" and (folder / "README.md").read_text() == "my model"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "README.md", "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    x = images()
    z = encode(vae, x)
    full = AutoencoderDCSSD.from_pretrained(folder)
    fp16 = AutoencoderDCSSD.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert full.dtype == torch.float32 and torch.equal(decode(full, z), decode(vae, z))
    assert fp16.dtype == torch.float16
    assert all(torch.equal(v, half.state_dict()[k]) for k, v in fp16.state_dict().items())
    # a non-main process writes the weights and leaves config.json as it is
    (folder / "config.json").unlink()
    vae.save_pretrained(folder, is_main_process=False)
    assert not (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(NotADirectoryError, match="is a file"):
        vae.save_pretrained(folder / "README.md")


def test_push_to_hub_offline_fails_cleanly_and_keeps_the_save(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    vae = tiny_vae()
    with pytest.raises(RuntimeError, match=r"push_to_hub: could not upload to the Hub repo 'me/vae'.*saved in"):
        vae.save_pretrained(tmp_path / "vae", push_to_hub=True, repo_id="me/vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.safetensors"]


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


def test_exports_and_checkpoints_load_with_diffusers_options(tmp_path, accelerate):
    """An export and a .ckpt take the same options as a save_pretrained folder: subfolder, torch_dtype,
    low_cpu_mem_usage, device_map (with accelerate); the weights are the model's."""
    model = tiny_dcssdae(latent_scale=1.5)
    state = {f"ae.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "dcssdae_config": model.config(), "global_step": 1}, tmp_path / "run.ckpt")
    write_export(model, tmp_path / "repo" / "export")
    options = {"low_cpu_mem_usage": accelerate, **({"device_map": "cpu"} if accelerate else {})}
    for source in (tmp_path / "run.ckpt", tmp_path / "repo" / "export"):
        loaded = AutoencoderDCSSD.from_pretrained(source, **options)
        assert loaded.config.scaling_factor == 1.5 and not loaded.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    half = AutoencoderDCSSD.from_pretrained(tmp_path / "repo", subfolder="export", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and half.config._name_or_path == str(tmp_path / "repo" / "export")
    assert AutoencoderDCSSD.from_pretrained(tmp_path / "run.ckpt", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert sorted(p.name for p in (tmp_path / "repo" / "export").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="variant"):
        AutoencoderDCSSD.from_pretrained(tmp_path / "repo" / "export", variant="fp16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a dcssdae export"):
        AutoencoderDCSSD.from_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
# Precision


def test_bf16_torch_dtype_and_fp8_layerwise_casting_decode_finite_images(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    x = images()
    z = encode(vae, x)
    reference = decode(vae, z)
    bf16 = AutoencoderDCSSD.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    z16, x16 = encode(bf16, x), decode(bf16, z)
    assert bf16.dtype == z16.dtype == x16.dtype == torch.bfloat16
    assert torch.isfinite(x16).all() and rel_err(z16, z) < 0.05 and rel_err(x16, reference) < 0.1

    fp8 = AutoencoderDCSSD.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    fp8.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert fp8.decoder.conv_in.weight.dtype == torch.float8_e4m3fn and fp8.dtype == torch.bfloat16
    z8, x8 = encode(fp8, x), decode(fp8, z)  # float32 input: cast to the compute dtype, not the storage dtype
    assert z8.dtype == x8.dtype == torch.bfloat16 and torch.isfinite(x8).all()
    assert rel_err(z8, z) < 0.3 and rel_err(x8, reference) < 0.3  # fp8 weights: 3 mantissa bits
    assert fp8.decoder.conv_in.weight.dtype == torch.float8_e4m3fn  # stored in fp8 again after each call
    # a float32 model: the compute dtype given casts it first
    fp32 = tiny_vae()
    fp32.enable_layerwise_casting(torch.float8_e4m3fn, torch.bfloat16)
    assert torch.isfinite(decode(fp32, z)).all() and fp32.decoder.out_norm.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Training: gradient checkpointing


def saved_activation_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes of the tensors autograd saved for backward while it ran: the activations held
    until backward (parameters excluded, each storage counted once)."""
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


@pytest.mark.parametrize("encoder", ["tiny-f8c4", "tiny-vq_f8c4"])
def test_gradient_checkpointing_gives_the_same_gradients_with_less_saved_activations(encoder):
    """enable_gradient_checkpointing (diffusers' switch) reaches the encoder stages and the decoder's blocks: the
    same loss and gradients, and fewer activations held for backward."""
    vae = tiny_vae(encoder=encoder).train()
    x = images(2, 32)
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def step():
        vae.zero_grad()

        def loss():
            q = vae.encoder(x)
            return vae.decoder(x_t, q.sample(torch.Generator().manual_seed(4))).square().mean() + q.kl().mean()

        value, saved = saved_activation_bytes(loss)
        value.backward()
        return value.detach(), saved, {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    loss, saved, grads = step()
    assert not vae.is_gradient_checkpointing
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    loss_ckpt, saved_ckpt, grads_ckpt = step()
    assert torch.equal(loss_ckpt, loss) and grads_ckpt.keys() == grads.keys()
    assert len(grads) == len(list(vae.parameters()))  # every parameter got a gradient
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-8, msg=name)
    assert saved_ckpt < 0.6 * saved, (saved_ckpt, saved)
    vae.disable_gradient_checkpointing()
    assert not vae.is_gradient_checkpointing
    with torch.no_grad():  # inference is unaffected by the switch
        z = vae.encode(x).latent
    vae.enable_gradient_checkpointing()
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent, z)


def test_checkpointing_benchmark_reports_ratios_in_one_process(tmp_path, monkeypatch):
    """benchmarks/bench_checkpointing.py on the tiny presets: both settings measured, the same gradients, less saved
    activation memory with checkpointing, the rows written as JSON with the command and commit."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_checkpointing")
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--encoder", "tiny-f8c4", "--decoder", "tiny", "--sizes", "32",
                         "--json", str(out)])
    (row,) = result["rows"]
    assert row["grad_max_abs_diff"] == 0 and row["off"]["loss"] == row["on"]["loss"]
    assert row["ratio"]["saved"] < 0.6 and row["on"]["time"] > 0 and row["off"]["peak"] > 0
    saved = json.loads(out.read_text())
    assert saved["rows"] == [row] and "bench_checkpointing.py" in saved["settings"]["command"]
    assert "commit" in saved["settings"]


# ----------------------------------------------------------------------------------------------------------------
# Latent statistics


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
