"""AutoencoderDCSSD: a DC-SSDAE as a diffusers model, to hand to a latent-diffusion pipeline as its `vae`.

    from dcssdae import AutoencoderDCSSD
    vae = AutoencoderDCSSD.from_pretrained("export_dir", torch_dtype=torch.bfloat16)   # or a .ckpt, or a folder
    z = vae.encode(x).latent                        # raw latent (B, c, H/f, W/f); x in [-1, 1]
    x_hat = vae.decode(z, generator=g).sample       # raw latent in; sampler settings: steps=, method=, noise=
    vae.save_pretrained("diffusers_dir")            # config.json + diffusion_pytorch_model.safetensors
    pipe = DiTPipeline(transformer=..., vae=vae, scheduler=...)

Latents are raw in and out: the pipeline applies the scaling, z_scaled = (z - shift_factor) * scaling_factor after
encoding and z = z_scaled / scaling_factor + shift_factor before decoding (diffusers' convention; pipelines without a
shift, e.g. DiT and Sana, only multiply and divide). `scaling_factor` and `shift_factor` come from the export's
`latent_scale` / `latent_shift`, measured by `dcssdae latent-stats`.

The class wraps a `dcssdae.autoencoder.DCSSDAE` (built with latent scale 1 and shift 0) and shares its encoder and
decoder modules, so the state-dict keys (`encoder.*`, `decoder.*`) are those of a dcssdae export and weights move
between the two formats unchanged. Encoding and decoding go through `DCSSDAE.encode` / `DCSSDAE.decode`. diffusers
is an optional dependency (`pip install dcssdae[diffusers]`); `import dcssdae` does not import it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("dcssdae.AutoencoderDCSSD needs diffusers: pip install 'dcssdae[diffusers]'") from error

from dcssdae.atomic_files import atomic_folder
from dcssdae.autoencoder import DCSSDAE

DCSSDAE_KEYS = ("encoder", "decoder", "encoder_overrides", "decoder_overrides", "corruption", "sampler")


class AutoencoderDCSSD(ModelMixin, ConfigMixin):
    """DC-AE encoder + SSDD U-ViT decoder with a diffusion sampler, in diffusers' autoencoder interface."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        encoder: str = "dc-ae-f32c32-in-1.0",
        decoder: str = "S",
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
            encoder, decoder, encoder_overrides, decoder_overrides, corruption, sampler: the DCSSDAE config (see
                `dcssdae.autoencoder.DCSSDAE`); `corruption` in its {"class_path", "init_args"} form.
            scaling_factor: the pipeline multiplies latents by it after encoding (`DCSSDAE.latent_scale`).
            shift_factor: the pipeline subtracts it before scaling (`DCSSDAE.latent_shift`).
            latent_channels: channels c of the latent; filled in from the encoder (pipelines read it), checked when
                given.
        """
        super().__init__()
        ae = DCSSDAE(encoder, decoder, corruption, encoder_overrides, decoder_overrides, sampler)
        if latent_channels is not None and latent_channels != ae.latent_channels:
            raise ValueError(f"latent_channels={latent_channels} does not match encoder {encoder!r}, which has "
                             f"{ae.latent_channels}")
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

    # -- what pipelines read ----------------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        """f: the latent grid is H/f x W/f (AutoencoderDC's attribute name)."""
        return self._ae.downsample_factor

    @property
    def ae(self) -> DCSSDAE:
        """The wrapped DCSSDAE (latent scale 1, shift 0), sharing this model's weights."""
        return self._ae

    # -- slicing and tiling ----------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one sample of the batch at a time."""
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

    # -- encode / decode ---------------------------------------------------------------------------------

    def _batches(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)

    def encode(self, x: torch.Tensor, return_dict: bool = True, sample_posterior: bool = False,
               generator: torch.Generator | None = None) -> EncoderOutput | tuple[torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of f -> raw latent (B, c, H/f, W/f), the posterior mean
        (or a sample with `sample_posterior`), in the model's dtype."""
        z = torch.cat([self._ae.encode(part, sample_posterior, generator) for part in self._batches(x)])
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        steps: int | None = None,
        method: str | None = None,
        **settings,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Raw latent -> image (B, 3, H, W) in about [-1, 1], sampled from `noise` (default: Gaussian noise from
        `generator`). `steps`, `method` and `settings` replace the configured sampler's (see
        `DCSSDAE.sampler_settings`; `steps=1` alone is the one-step decoder)."""
        if noise is not None and self.use_slicing and z.shape[0] > 1:
            parts = [self._ae.decode(zi, noise=ni, steps=steps, method=method, **settings)
                     for zi, ni in zip(z.split(1), noise.split(1))]
        else:
            parts = [self._ae.decode(part, noise=noise, steps=steps, method=method, generator=generator, **settings)
                     for part in self._batches(z)]
        x = torch.cat(parts)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[torch.Tensor]:
        """decode(encode(sample))."""
        z = self.encode(sample, sample_posterior=sample_posterior, generator=generator).latent
        return self.decode(z, return_dict=return_dict, generator=generator)

    # -- conversion to and from dcssdae ----------------------------------------------------------------

    @classmethod
    def from_dcssdae(cls, model: DCSSDAE) -> AutoencoderDCSSD:
        """The same network and weights (copied), latent_scale / latent_shift as scaling_factor / shift_factor."""
        config = model.config()
        vae = cls(**{k: config[k] for k in DCSSDAE_KEYS}, scaling_factor=config["latent_scale"],
                  shift_factor=config["latent_shift"])
        # assign: the copies keep the model's dtype (no ModelMixin.to(dtype), which warns whatever the dtype)
        vae.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
        return vae.eval()

    def to_dcssdae(self) -> DCSSDAE:
        """A DCSSDAE with these weights (copied) and the scaling as latent_scale / latent_shift."""
        config = {k: self.config[k] for k in DCSSDAE_KEYS}
        model = DCSSDAE.from_config({**config, "latent_scale": self.config.scaling_factor,
                                     "latent_shift": self.config.shift_factor})
        model.load_state_dict(self.state_dict(), strict=True)
        return model.to(self.dtype).eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> AutoencoderDCSSD:
        """Load a dcssdae export directory (config.json + model.safetensors), a `.ckpt` from `dcssdae fit` (its EMA
        weights), or a folder written by `save_pretrained` (diffusers' layout; any other diffusers option in
        `kwargs`). `subfolder` is looked up under the path; `torch_dtype` casts the weights."""
        path = Path(pretrained_model_name_or_path)
        here = path / subfolder if subfolder else path
        if here.is_file() or (here / "model.safetensors").is_file():
            model = DCSSDAE.from_pretrained(here)
            return cls.from_dcssdae(model.to(torch_dtype) if torch_dtype is not None else model)
        if here.is_dir() and not (here / "config.json").is_file():
            raise FileNotFoundError(f"{here}: neither a dcssdae export (config.json + model.safetensors), nor a "
                                    "folder written by AutoencoderDCSSD.save_pretrained, nor a .ckpt")
        if subfolder:
            kwargs["subfolder"] = subfolder
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' layout (config.json + diffusion_pytorch_model.safetensors), written to a temporary folder
        next to `save_directory` and renamed into place (an existing folder is replaced)."""
        with atomic_folder(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)

