"""AutoencoderDCSSD: a DC-SSDAE as a diffusers model, to hand to a latent-diffusion pipeline as its `vae`.

    from dcssdae import AutoencoderDCSSD
    vae = AutoencoderDCSSD.from_pretrained("export_dir", torch_dtype=torch.bfloat16)   # or a .ckpt, or a folder
    z = vae.encode(x).latent                        # raw latent (B, c, H/f, W/f); x in [-1, 1]
    x_hat = vae.decode(z, generator=g).sample       # raw latent in; sampler settings: steps=, method=, noise=
    vae.save_pretrained("diffusers_dir")            # config.json + diffusion_pytorch_model.safetensors
    vae.save_pretrained("diffusers_dir", variant="fp16")   # beside them: diffusion_pytorch_model.fp16.safetensors
    pipe = DiTPipeline(transformer=..., vae=vae, scheduler=...)   # or DiTPipeline.from_pretrained(saved_pipeline)
    vae.enable_layerwise_casting(torch.float8_e4m3fn, torch.bfloat16)   # fp8 storage, bf16 compute
    vae.enable_gradient_checkpointing()             # encoder and decoder blocks recomputed in backward

Latents are raw in and out: the pipeline applies the scaling, z_scaled = (z - shift_factor) * scaling_factor after
encoding and z = z_scaled / scaling_factor + shift_factor before decoding (diffusers' convention; pipelines without a
shift, e.g. DiT and Sana, only multiply and divide). `scaling_factor` and `shift_factor` come from the export's
`latent_scale` / `latent_shift`, measured by `dcssdae latent-stats`.

The class wraps a `dcssdae.autoencoder.DCSSDAE` (built with latent scale 1 and shift 0) and shares its encoder and
decoder modules, so the state-dict keys (`encoder.*`, `decoder.*`) are those of a dcssdae export and weights move
between the two formats unchanged. The config names the presets `encoder_preset` / `decoder_preset` (DCSSDAE's
`encoder` / `decoder`: diffusers reads config keys as attributes, which must not shadow the submodules); configs
saved with the old names load. Encoding and decoding run DCSSDAE's networks and sampler (`posterior`,
`sampler_settings`, `sample`) in the model's compute dtype (`self.dtype`, which is the compute dtype under layerwise
casting); noise comes from diffusers' `randn_tensor` (one generator per sample, or a CPU generator for a model on
another device). diffusers is an optional dependency (`pip install dcssdae[diffusers]`); `import dcssdae` does not
import it.

Loading: `from_pretrained` of a folder written by `save_pretrained` is diffusers' own; an export or a `.ckpt` is
first laid out as such a folder in a temporary directory (the export's weights file linked, not copied), so every
diffusers option (`torch_dtype`, `device_map`, `low_cpu_mem_usage`, ...) works on every path. Saving:
`save_pretrained` writes diffusers' files into a temporary folder inside the target, then moves each into place
with one rename; files it did not write stay (other variants, anything else in the folder), except older files of
the same weights name and variant that diffusers would load instead of the new ones (shards, index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("dcssdae.AutoencoderDCSSD needs diffusers: pip install 'dcssdae[diffusers]'") from error

from dcssdae.autoencoder import DCSSDAE, DESCENT_METHODS, load_weights
from dcssdae.encoders import Posterior

# DCSSDAE config key -> AutoencoderDCSSD config key
DCSSDAE_KEYS = {"encoder": "encoder_preset", "decoder": "decoder_preset", "encoder_overrides": "encoder_overrides",
                "decoder_overrides": "decoder_overrides", "corruption": "corruption", "sampler": "sampler"}
RENAMED = {"encoder": "encoder_preset", "decoder": "decoder_preset"}  # old AutoencoderDCSSD keys -> new ones
CONFIG_FILE = "config.json"


def renamed(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the old preset keys renamed (`encoder` -> `encoder_preset`, `decoder` -> `decoder_preset`)."""
    config = dict(config)
    for old, new in RENAMED.items():
        if old in config:
            value = config.pop(old)
            config.setdefault(new, value)
    return config


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved AutoencoderDCSSD config in today's form: the preset keys renamed (`renamed`), and a descent sampler
    saved without a step schedule given the constant one it was validated with (the rule of
    `DCSSDAE.from_config`)."""
    config = renamed(config)
    sampler = config.get("sampler")
    if isinstance(sampler, dict) and sampler.get("method") in DESCENT_METHODS and "schedule" not in sampler:
        config["sampler"] = {**sampler, "schedule": "constant"}
    return config


class AutoencoderDCSSD(ModelMixin, ConfigMixin):
    """DC-AE encoder + SSDD U-ViT decoder with a diffusion sampler, in diffusers' autoencoder interface."""

    _supports_gradient_checkpointing = True  # the encoder stages and the decoder honour `gradient_checkpointing`
    # device_map="auto" places whole networks (the decoder's skips and the sampler cross its blocks)
    _no_split_modules: ClassVar[list[str]] = ["DCEncoder", "KLEncoder", "UViTDecoder"]

    @register_to_config
    def __init__(
        self,
        encoder_preset: str = "dc-ae-f32c32-in-1.0",
        decoder_preset: str = "S",
        encoder_overrides: dict[str, Any] | None = None,
        decoder_overrides: dict[str, Any] | None = None,
        corruption: dict[str, Any] | None = None,
        sampler: dict[str, Any] | None = None,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        latent_channels: int | None = None,
    ):
        """
        Args:
            encoder_preset: DCSSDAE's `encoder` (an encoder preset, `dcssdae.encoders.ENCODERS`).
            decoder_preset: DCSSDAE's `decoder` (a decoder preset, `dcssdae.decoder.DECODERS`).
            encoder_overrides, decoder_overrides, corruption, sampler: the rest of the DCSSDAE config (see
                `dcssdae.autoencoder.DCSSDAE`); `corruption` in its {"class_path", "init_args"} form.
            scaling_factor: the pipeline multiplies latents by it after encoding (`DCSSDAE.latent_scale`).
            shift_factor: the pipeline subtracts it before scaling (`DCSSDAE.latent_shift`).
            latent_channels: channels c of the latent; filled in from the encoder (pipelines read it), checked when
                given.
        """
        super().__init__()
        ae = DCSSDAE(encoder_preset, decoder_preset, corruption, encoder_overrides, decoder_overrides, sampler)
        if latent_channels is not None and latent_channels != ae.latent_channels:
            raise ValueError(f"latent_channels={latent_channels} does not match encoder {encoder_preset!r}, which "
                             f"has {ae.latent_channels}")
        outside = sorted(k for k in ae.state_dict() if not k.startswith(("encoder.", "decoder.")))
        if outside:
            raise TypeError(f"DCSSDAE holds weights outside encoder/decoder that AutoencoderDCSSD would not save: "
                            f"{outside[:5]}")
        self.encoder, self.decoder = ae.encoder, ae.decoder  # registered here: state-dict keys encoder.*, decoder.*
        object.__setattr__(self, "_ae", ae)  # not a submodule: it shares the two modules above
        self.register_to_config(latent_channels=ae.latent_channels, sampler=dict(ae.sampler),
                                corruption=ae.config()["corruption"])
        self.use_slicing = False
        self.use_tiling = False

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' `from_config` / `from_pretrained` step that picks the constructor arguments: configs saved
        with older key names are upgraded first (`upgrade_config`)."""
        return super().extract_init_dict(upgrade_config(config_dict), **renamed(kwargs))

    # -- what pipelines read ----------------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        """f: the latent grid is H/f x W/f (AutoencoderDC's attribute name)."""
        return self._ae.downsample_factor

    @property
    def ae(self) -> DCSSDAE:
        """The wrapped DCSSDAE (latent scale 1, shift 0), sharing this model's weights."""
        return self._ae

    # -- slicing, tiling, precision ------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one sample of the batch at a time (the noise is still drawn for the whole batch)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile: int = 512, overlap: int = 128) -> None:
        """Tiled network evaluation on `tile`-pixel tiles blended over `overlap` pixels (see `dcssdae.tiling`)."""
        self._ae.enable_tiling(tile, overlap)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self._ae.disable_tiling()
        self.use_tiling = False

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None, *args, **kwargs) -> None:
        """diffusers' layerwise casting: convolution and linear weights stored in `storage_dtype` (e.g. fp8) and cast
        to `compute_dtype` (default: the model's dtype) for each call; norms and other parameters are kept in
        `compute_dtype` (the model is cast to it first). The decoder's lean inference path, which reads weights
        outside their modules' calls, is switched off."""
        if compute_dtype is not None and compute_dtype != self.dtype:
            torch.nn.Module.to(self, compute_dtype)  # not ModelMixin.to, which warns on every dtype cast
        self.decoder.lean_min_pixels = None
        super().enable_layerwise_casting(storage_dtype, compute_dtype, *args, **kwargs)

    # -- encode / decode ---------------------------------------------------------------------------------

    def _batches(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)

    def _noise(self, shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
        """Gaussian noise (float32) from `generator`: one torch.Generator, or a list of one per sample; drawn on a CPU
        generator's device and moved to `device` (diffusers' randn_tensor)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample, "
                                 "or a single torch.Generator")
            generator = list(generator)
        return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=torch.float32)

    def encode(self, x: torch.Tensor, return_dict: bool = True, sample_posterior: bool = False,
               generator: torch.Generator | list[torch.Generator] | None = None) -> EncoderOutput | tuple[torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of f -> raw latent (B, c, H/f, W/f), the posterior mean
        (or a sample with `sample_posterior`, from `generator`: one, or one per sample), in the compute dtype."""
        dtype = self.dtype
        posteriors = [self._ae.posterior(part.to(dtype)) for part in self._batches(x)]
        q = Posterior(torch.cat([p.mean for p in posteriors]),
                      None if posteriors[0].deterministic else torch.cat([p.logvar for p in posteriors]))
        z = q.mean
        if sample_posterior and not q.deterministic:
            z = q.mean + q.std * self._noise(q.mean.shape, generator, q.mean.device)
        z = z.to(dtype)
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        steps: int | None = None,
        method: str | None = None,
        **settings,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Raw latent -> image (B, 3, H, W) in about [-1, 1], sampled from `noise` (default: Gaussian noise from
        `generator`, one or one per sample, drawn in float32 for the whole batch). `steps`, `method` and `settings`
        replace the configured sampler's (see `DCSSDAE.sampler_settings`; `steps=1` alone is the one-step
        decoder). Runs in the compute dtype, under the caller's grad mode."""
        dtype = self.dtype
        z = z.to(dtype)
        f = self.spatial_compression_ratio
        shape = (z.shape[0], self.decoder.image_channels, z.shape[-2] * f, z.shape[-1] * f)
        if noise is None:
            noise = self._noise(shape, generator, z.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for z of shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(device=z.device, dtype=dtype)
        sampler = self._ae.sampler_settings(steps, method, **settings)
        x = torch.cat([self._ae.sample(n, zi, sampler)[0] for zi, n in zip(self._batches(z), self._batches(noise))])
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[torch.Tensor]:
        """decode(encode(sample))."""
        z = self.encode(sample, sample_posterior=sample_posterior, generator=generator).latent
        return self.decode(z, return_dict=return_dict, generator=generator)

    # -- conversion to and from dcssdae ----------------------------------------------------------------

    @staticmethod
    def config_of(dcssdae_config: dict[str, Any]) -> dict[str, Any]:
        """The AutoencoderDCSSD config of a DCSSDAE config (`DCSSDAE.config()`, an export's config.json): keys
        renamed, latent_scale / latent_shift as scaling_factor / shift_factor. Unknown keys are an error."""
        config = {k: v for k, v in dcssdae_config.items() if k != "export"}  # an export's metadata
        known = {*DCSSDAE_KEYS, "latent_scale", "latent_shift"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown DCSSDAE config key(s) {unknown}; known: {sorted(known)}")
        out = {DCSSDAE_KEYS[k]: config[k] for k in DCSSDAE_KEYS if k in config}
        return {**out, "scaling_factor": float(config.get("latent_scale", 1.0)),
                "shift_factor": float(config.get("latent_shift", 0.0))}

    @classmethod
    def from_dcssdae(cls, model: DCSSDAE) -> AutoencoderDCSSD:
        """The same network and weights (copied), latent_scale / latent_shift as scaling_factor / shift_factor."""
        vae = cls(**cls.config_of(model.config()))
        # assign: the copies keep the model's dtype (no ModelMixin.to(dtype), which warns whatever the dtype)
        vae.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
        return vae.eval()

    def to_dcssdae(self) -> DCSSDAE:
        """A DCSSDAE with these weights (copied) and the scaling as latent_scale / latent_shift."""
        config = {k: self.config[key] for k, key in DCSSDAE_KEYS.items()}
        model = DCSSDAE.from_config({**config, "latent_scale": self.config.scaling_factor,
                                     "latent_shift": self.config.shift_factor})
        model.load_state_dict(self.state_dict(), strict=True)
        return model.to(self.dtype).eval()

    # -- loading ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> AutoencoderDCSSD:
        """Load a folder written by `save_pretrained` (diffusers' layout, local or on the Hub), a dcssdae export
        directory (config.json + model.safetensors) or a `.ckpt` from `dcssdae fit` (its EMA weights). Every
        diffusers option applies to all three (`subfolder`, `torch_dtype`, `device_map`, `low_cpu_mem_usage`, ...;
        `variant` only to a save_pretrained folder)."""
        path = Path(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        here = path / subfolder if subfolder else path
        is_export = here.is_dir() and (here / "model.safetensors").is_file() and not _is_diffusers_folder(here)
        if not (here.is_file() or is_export):
            if here.is_dir() and not (here / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{here}: neither a dcssdae export (config.json + model.safetensors), nor a "
                                        "folder written by AutoencoderDCSSD.save_pretrained, nor a .ckpt")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if kwargs.get("variant") is not None:
            raise ValueError(f"variant={kwargs['variant']!r}: {here} holds one set of weights (a dcssdae export or "
                             "checkpoint); variants are files of a folder written by save_pretrained")
        kwargs.pop("subfolder", None)
        kwargs.pop("variant", None)
        with tempfile.TemporaryDirectory(prefix="dcssdae-diffusers-") as tmp:
            _as_diffusers_folder(here, Path(tmp))
            loaded = super().from_pretrained(tmp, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        model.register_to_config(_name_or_path=str(here))
        return loaded

    # -- saving -----------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """diffusers' files (config.json, diffusion_pytorch_model[.variant].safetensors or its shards + index),
        each written to a temporary folder inside `save_directory` and moved into place by one rename. Nothing else
        in the folder is touched (other variants stay), except files of the same weights name and variant from an
        older save that this one does not write (shards, index), which diffusers would load in place of the new
        weights. `is_main_process=False` writes the weights only (diffusers' convention). `push_to_hub=True`
        (`repo_id=`, `token=`, `private=`, `commit_message=`, `create_pr=`) uploads the files this save wrote;
        a failed upload raises RuntimeError and leaves the saved files."""
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} is a file: save_pretrained writes a folder; pass a folder path")
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".save_pretrained-"))
        try:
            super().save_pretrained(tmp, is_main_process=is_main_process, save_function=save_function,
                                    safe_serialization=safe_serialization, variant=variant,
                                    max_shard_size=max_shard_size, push_to_hub=False, **kwargs)
            written = sorted(p.name for p in tmp.iterdir())
            # weights first, the config last: a reader sees the new config only once the new weights are there
            for name in sorted(written, key=lambda n: (n == CONFIG_FILE, n.endswith(".json"), n)):
                _fsync(tmp / name)
                os.replace(tmp / name, out / name)
            _fsync(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_main_process:
            for stale in _own_weight_files(out, safe_serialization, variant) - set(written):
                (out / stale).unlink(missing_ok=True)
        if push_to_hub:
            self._push(out, written, **hub)

    def _push(self, folder: Path, files: list[str], repo_id: str | None = None, token: str | None = None,
              private: bool | None = None, commit_message: str | None = None, create_pr: bool = False) -> None:
        """Upload `files` of `folder` to the Hub repo `repo_id` (default: the folder's name), creating it."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = repo_id or folder.resolve().name
        try:
            repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
            upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files, token=token,
                          commit_message=commit_message or "Upload AutoencoderDCSSD", create_pr=create_pr)
        except Exception as e:  # offline, no token, no permission, network: huggingface_hub's many error types
            raise RuntimeError(f"push_to_hub: could not upload to the Hub repo {repo_id!r} ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); the model "
                               f"is saved in {folder}, push it later with huggingface_hub.upload_folder") from e


# ----------------------------------------------------------------------------------------------------------------
# Files: an export or a checkpoint laid out as a save_pretrained folder, and the weight files a save owns.


def _is_diffusers_folder(folder: Path) -> bool:
    """Whether `folder` holds a diffusers config (written by save_pretrained), not a dcssdae export's."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return "_class_name" in config or "_diffusers_version" in config


def _as_diffusers_folder(source: Path, folder: Path) -> None:
    """Lay out an export directory or a `.ckpt` as a save_pretrained folder in `folder`: config.json, and the
    weights as diffusion_pytorch_model.safetensors (an export's file linked where the file system allows)."""
    from safetensors.torch import save_file

    from dcssdae.atomic_files import write_json

    weights = folder / "diffusion_pytorch_model.safetensors"
    if source.is_dir():
        config = json.loads((source / CONFIG_FILE).read_text())
        try:
            os.symlink((source / "model.safetensors").resolve(), weights)
        except OSError:  # no symlinks here (e.g. Windows without the privilege): a copy
            shutil.copyfile(source / "model.safetensors", weights)
    else:
        config, state = load_weights(source)
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
        del state
    write_json({**AutoencoderDCSSD.config_of(config), "_class_name": AutoencoderDCSSD.__name__}, folder / CONFIG_FILE)


def _own_weight_files(folder: Path, safe_serialization: bool, variant: str | None) -> set[str]:
    """Names in `folder` of the weights a save with these settings writes: the single file, shards and index."""
    ext = "safetensors" if safe_serialization else "bin"
    suffix = f".{variant}" if variant else ""
    single = re.compile(rf"diffusion_pytorch_model(-\d{{5}}-of-\d{{5}})?{re.escape(suffix)}\.{ext}")
    index = f"diffusion_pytorch_model.{ext}.index{suffix}.json"
    return {p.name for p in folder.iterdir() if p.is_file() and (single.fullmatch(p.name) or p.name == index)}


def _fsync(path: Path) -> None:
    """Flush a file (or, where the OS allows, a folder entry) to disk before it is renamed into place."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
