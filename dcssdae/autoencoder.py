"""DCSSDAE: the autoencoder users load. Encoder + decoder + corruption + sampler settings + latent scaling.

    z = ae.encode(x)                      # (B, 3, H, W) in [-1, 1] -> (B, c, H/f, W/f), scaled for diffusion
    x_hat = ae.decode(z)                  # sampler from noise (default: the configured one, 16 EqM steps)
    x_hat = ae.decode(z, steps=1)         # single step (a distilled decoder)
    x_hat = ae.reconstruct(x, pad=True)   # any H x W: reflect-padded to a multiple of f, cropped back
    ae.enable_tiling(tile=512, overlap=128)  # large images: tiled network evaluation, blended (dcssdae.tiling)
    ae.to(torch.bfloat16)                 # half precision: encode and decode run in the model's dtype
    with torch.autocast("cuda", torch.bfloat16): x_hat = ae.decode(z, steps=1)  # or mixed precision
    ae.compile()                          # torch.compile the encoder and decoder networks (in place)
    ae = DCSSDAE.from_pretrained("export_dir")   # or a Lightning .ckpt from `dcssdae fit`

The network knows nothing about training (no losses here); the Lightning system in `dcssdae.system` wires it to
the objectives. `config()` is the JSON-able description that `from_config` rebuilds the network from; it is
stored in every checkpoint (`checkpoint["dcssdae_config"]`) and in an export's `config.json`.

Latent scaling (Rombach et al. 2022, Sec. 4.3.2 "scale factor"): `encode` returns (mean - latent_shift) *
latent_scale and `decode` undoes it, so that a latent diffusion model sees unit-variance latents. Training uses
the raw latent. `dcssdae latent-stats` measures the two numbers and stores them with an export.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcssdae.decoder import build_decoder
from dcssdae.encoders import Posterior, build_encoder
from dcssdae.objectives import EquilibriumMatching, FlowMatching
from dcssdae.sampling import sample, settings_of
from dcssdae.tiling import Tiling, crop, pad_to_multiple, tiled_call

Corruption = EquilibriumMatching | FlowMatching
DESCENT_METHODS = ("gd", "nesterov", "adaptive")  # EqM descent with a step schedule (and the corruption's step_to_data)
EQM_METHODS = (*DESCENT_METHODS, "one_step")
FM_METHODS = ("euler",)


# ------------------------------------------------------------------------------------------------
# Corruption <-> {"class_path", "init_args"} (the same form as in the YAML configs).


def corruption_config(corruption: Corruption) -> dict[str, Any]:
    """{"class_path": ..., "init_args": {...}} of a corruption object, read back from its attributes."""
    cls = type(corruption)
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [n for n in names if not hasattr(corruption, n)]
    if missing:
        raise TypeError(f"{cls.__name__} does not keep its init arguments {missing} as attributes")
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(corruption, n) for n in names}}


def network_corruption_config(corruption: Corruption) -> dict[str, Any]:
    """`corruption_config` without the settings that only choose training levels (`training_only`, e.g. EqM's
    noise_power): two corruptions with the same result make the decoder's output mean the same thing."""
    config = corruption_config(corruption)
    drop = getattr(type(corruption), "training_only", ())
    return {**config, "init_args": {k: v for k, v in config["init_args"].items() if k not in drop}}


LEGACY_MODULE = "dcssdae.corruption"  # where older checkpoints and exports name the objectives


def build_corruption(config: Corruption | dict[str, Any] | None) -> Corruption:
    """A corruption object from itself, a {"class_path", "init_args"} dict, or None (EqM, linear decay).

    A saved EquilibriumMatching dict without `parameterization` (a checkpoint or export written before that option)
    was trained with the network outputting the field: it is built with parameterization="field".
    """
    if config is None:
        return EquilibriumMatching()
    if not isinstance(config, dict):
        return config
    class_path = config["class_path"]
    if class_path.startswith(LEGACY_MODULE + "."):  # saved when the objectives lived in `dcssdae.corruption`
        class_path = "dcssdae.objectives." + class_path[len(LEGACY_MODULE) + 1:]
    module, _, name = class_path.rpartition(".")
    known = {"dcssdae.objectives.EquilibriumMatching", "dcssdae.objectives.FlowMatching"}
    if class_path not in known:
        raise ValueError(f"unknown corruption {config['class_path']!r}; known: {sorted(known)}")
    init_args = dict(config.get("init_args") or {})
    if class_path == "dcssdae.objectives.EquilibriumMatching":
        init_args.setdefault("parameterization", "field")  # saved before the option existed: the old behaviour
    return getattr(importlib.import_module(module), name)(**init_args)


# ------------------------------------------------------------------------------------------------
# The autoencoder.


class DCSSDAE(nn.Module):
    """DC-AE encoder + SSDD U-ViT decoder + its corruption process (EqM or FM) and decoding sampler."""

    def __init__(
        self,
        encoder: str = "dc-ae-f32c32-in-1.0",
        decoder: str = "S",
        corruption: Corruption | dict | None = None,
        encoder_overrides: dict[str, Any] | None = None,
        decoder_overrides: dict[str, Any] | None = None,
        sampler: dict[str, Any] | None = None,
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
        encoder_pretrained: str | None = None,
    ):
        """
        Args:
            encoder: encoder preset (`dcssdae.encoders.ENCODERS`).
            decoder: decoder preset (`dcssdae.decoder.DECODERS`).
            corruption: EquilibriumMatching (default, linear decay) or FlowMatching. It also decides whether the
                decoder is time-conditioned (FM) or not (EqM).
            encoder_overrides: constructor arguments replacing the encoder preset's.
            decoder_overrides: constructor arguments replacing the decoder preset's.
            sampler: decoding sampler, {"method": ..., **settings} for `dcssdae.sampling.sample`. Default
                (`default_sampler`): 16 steps of gradient descent on the noise schedule (EqM) or 8 Euler steps (FM).
            latent_scale: `encode` returns (mean - latent_shift) * latent_scale.
            latent_shift: see `latent_scale`.
            encoder_pretrained: weights to load into the encoder at construction (see `build_encoder`); not part of
                `config()` (a rebuilt model gets all its weights from its state dict).
        """
        super().__init__()
        self.corruption = build_corruption(corruption)
        encoder_overrides, decoder_overrides = dict(encoder_overrides or {}), dict(decoder_overrides or {})
        time_conditioned = self.corruption.time_conditioned
        if decoder_overrides.get("time_conditioned", time_conditioned) != time_conditioned:
            raise ValueError(f"decoder_overrides sets time_conditioned={decoder_overrides['time_conditioned']} but "
                             f"{type(self.corruption).__name__} needs time_conditioned={time_conditioned}; drop it "
                             "(the corruption decides)")
        decoder_overrides.pop("time_conditioned", None)
        if "extra_out_channels" in decoder_overrides:
            raise ValueError("decoder_overrides sets extra_out_channels; drop it (the corruption decides: the maps "
                             "its parameterisation reads besides the image, e.g. EqM's gate)")
        self.encoder = build_encoder(encoder, pretrained=encoder_pretrained, **encoder_overrides)
        self.decoder = build_decoder(decoder, self.encoder.latent_channels, time_conditioned=time_conditioned,
                                     extra_out_channels=getattr(self.corruption, "extra_outputs", 0),
                                     **decoder_overrides)
        self.sampler = self._check_sampler(sampler or self.default_sampler())
        self.latent_scale, self.latent_shift = float(latent_scale), float(latent_shift)
        self.tiling: Tiling | None = None  # see enable_tiling
        self._config = {"encoder": encoder, "decoder": decoder, "encoder_overrides": encoder_overrides,
                        "decoder_overrides": decoder_overrides}

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.encoder.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: `encode` and `decode` cast their inputs to it and compute in it."""
        return next(self.parameters()).dtype

    # -- sampler settings ------------------------------------------------------------------------

    def default_sampler(self, steps: int | None = None) -> dict[str, Any]:
        """EqM: 16 steps of gradient descent on the noise schedule (power 2; the DDIM update, a sample of
        p(x | z): on the exact field of a 2000-dimensional Gaussian within 4% of the true spread, 10% at 8 steps;
        `dcssdae.sampling.ddim_gaussian_spread` with known levels); FM: 8 Euler steps."""
        if isinstance(self.corruption, FlowMatching):
            return {"method": "euler", "steps": steps or 8}
        return {"method": "gd", "steps": steps or 16, "schedule": "noise", "power": 2.0}

    def one_step_sampler(self) -> dict[str, Any]:
        """The single-step decoder: x = noise - f(noise) / c(0) (EqM), or one Euler step from t = 1 (FM). For a
        trained (undistilled) model this is the posterior mean E[x | noise, z], not a sample."""
        if isinstance(self.corruption, FlowMatching):
            return {"method": "euler", "steps": 1}
        return {"method": "one_step", "eta": self._eta()}

    def _eta(self) -> float:
        return float(self.corruption.step_to_data(0.0))  # 1 / c(0)

    def _check_sampler(self, sampler: dict[str, Any]) -> dict[str, Any]:
        sampler = dict(sampler)
        method = sampler.get("method")
        allowed = FM_METHODS if isinstance(self.corruption, FlowMatching) else EQM_METHODS
        if method not in allowed:
            raise ValueError(f"sampler method {method!r} does not fit {type(self.corruption).__name__}; "
                             f"use one of {allowed}")
        unknown = sorted(set(sampler) - {"method"} - (set(settings_of(method)) - {"step_to_data"}))
        if unknown:
            takes = [name for name in settings_of(method) if name != "step_to_data"]
            raise ValueError(f"unknown setting(s) {unknown} for sampler {method!r}; it takes {takes}")
        if method in DESCENT_METHODS:
            sampler.setdefault("schedule", "noise")  # explicit in every saved config (see from_config)
            if sampler["schedule"] == "noise" and "eta" in sampler:
                raise ValueError(f"sampler {sampler}: eta is the step of schedule 'constant'; under schedule 'noise' "
                                 "the steps follow the noise grid and the objective's step to the data: drop eta, "
                                 "or set schedule: constant")
        if method == "one_step" or sampler.get("schedule") == "constant":
            sampler.setdefault("eta", self._eta())  # 1 / c(0) of *this* corruption, not the sampling module's default
        return sampler

    def sampler_settings(self, steps: int | None = None, method: str | None = None, **settings) -> dict[str, Any]:
        """The configured sampler with some settings replaced; `steps=1` without a method means one step, and more
        than one step from a model configured to decode in one step (a distilled student) means the default sampler
        (`default_sampler`) at that count."""
        if method is None and steps == 1 and not settings:
            return self.one_step_sampler()
        if method is None and steps is not None and self.sampler["method"] == "one_step":
            return self._check_sampler({**self.default_sampler(steps), **settings})
        base = dict(self.sampler) if method in (None, self.sampler["method"]) else {"method": method}
        if steps is not None:
            base["max_steps" if base["method"] == "adaptive" else "steps"] = steps
        return self._check_sampler({**base, **settings})

    # -- the API -----------------------------------------------------------------------------------

    def posterior(self, x: torch.Tensor) -> Posterior:
        """q(z | x) of the raw (unscaled) latent; tiled when `enable_tiling` is on and x is larger than a tile."""
        if self.tiling is None:
            return self.encoder(x)
        return self._tiled_posterior(x)

    def encode(self, x: torch.Tensor, sample_posterior: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latent (B, c, H/f, W/f): the posterior mean (or a sample)."""
        posterior = self.posterior(x.to(self.dtype))
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return ((z - self.latent_shift) * self.latent_scale).to(self.dtype)

    def raw_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The latent the decoder network sees, from a scaled one (`encode`'s output): z / latent_scale +
        latent_shift, in the weights' dtype."""
        return z.to(self.dtype) / self.latent_scale + self.latent_shift

    def decode(
        self,
        z: torch.Tensor,
        noise: torch.Tensor | None = None,
        steps: int | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        return_nfe: bool = False,
        **settings,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent -> image (B, 3, H, W), sampled from `noise` (default: fresh Gaussian noise).

        `steps`, `method` and `settings` replace the configured sampler's (`steps=1` alone: the one-step decoder).
        Runs under the caller's grad mode. With `return_nfe`, also returns the decoder evaluations per sample.
        The sampler's state is float32 whatever the weights' dtype (a half-precision network is evaluated in its
        dtype and its output read back in float32: bf16 cannot hold the small updates of the last steps); the image
        is returned in the weights' dtype.
        """
        z = self.raw_latent(z)
        f = self.downsample_factor
        shape = (z.shape[0], self.decoder.image_channels, z.shape[-2] * f, z.shape[-1] * f)
        if noise is None:
            # drawn in float32 whatever the model's dtype: the same generator gives the same noise in fp32/bf16/fp16
            noise = torch.randn(shape, generator=generator, device=z.device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for z of shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        noise = noise.float()
        x, nfe = self.sample(noise, z, self.sampler_settings(steps, method, **settings))
        x = x.to(self.dtype)
        return (x, nfe) if return_nfe else x

    def sample(self, noise: torch.Tensor, z: torch.Tensor, sampler: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, nfe): run `sampler` ({"method": ..., **settings}, e.g. from `sampler_settings`) from `noise` given the
        raw (unscaled) latent z. The EqM descent methods get the corruption's `step_to_data` for their schedule."""
        settings = dict(sampler)
        method = settings.pop("method")
        if method in DESCENT_METHODS:
            settings["step_to_data"] = self.corruption.step_to_data  # s(gamma) of the schedule; not in the config
        return sample(self.pred, noise, method, context=(z,), **settings)

    def pred(self, x_t: torch.Tensor, z: torch.Tensor, *time: torch.Tensor) -> torch.Tensor:
        """The decoder's output as the corruption's prediction (EqM field f, FM velocity v) at x_t, given the raw
        latent z (and FM's time t): the `fn` every sampler evaluates. The network runs in z's dtype (the weights'
        dtype, from `raw_latent`; the compute dtype under diffusers' layerwise casting, whose stored weights may be
        fp8); the prediction comes back in x_t's (the sampler's float32 state)."""
        return self.corruption.pred(x_t, self.network()(x_t.to(z.dtype), z, *time)).to(x_t.dtype)

    def reconstruct(self, x: torch.Tensor, pad: bool = False, **decode_kwargs) -> torch.Tensor:
        """decode(encode(x)) with the posterior mean. With `pad`, any H x W: x is reflect-padded at the bottom and
        right to multiples of the compression factor and the reconstruction is cropped back to H x W (a `noise`
        passed along must then have the padded shape)."""
        if not pad:
            return self.decode(self.encode(x), **decode_kwargs)
        x_pad, size = pad_to_multiple(x, self.downsample_factor)
        return crop(self.decode(self.encode(x_pad), **decode_kwargs), size)

    # -- speed ---------------------------------------------------------------------------------------

    def compile(self, **kwargs) -> DCSSDAE:
        """Compile the encoder and the decoder network in place with torch.compile (`kwargs` go to it, e.g.
        mode="max-autotune"; default dynamic=False: one graph per image size). Every path that runs them (encode,
        decode with any sampler, tiling, training) then runs the compiled graphs; weights, state-dict keys and
        outputs (up to float rounding) are unchanged. Returns self."""
        kwargs.setdefault("dynamic", False)
        self.encoder.compile(**kwargs)
        self.decoder.compile(**kwargs)
        return self

    # -- tiling: large images in bounded memory (dcssdae.tiling) ---------------------------------------

    def enable_tiling(self, tile: int = 512, overlap: int = 128) -> None:
        """Evaluate the encoder and the decoder network on overlapping `tile` x `tile` pixel tiles, blended over
        `overlap` pixels (both multiples of the compression factor), for images larger than a tile. Decoding still
        samples the whole image with one noise draw; only each network evaluation is tiled."""
        tiling = Tiling(tile, overlap)
        tiling.check(self.downsample_factor)
        self.tiling = tiling

    def disable_tiling(self) -> None:
        self.tiling = None

    def network(self):
        """The decoder network as the sampler calls it, fn(x, z[, t]): tiled when tiling is enabled."""
        if self.tiling is None:
            return self.decoder
        return lambda x, z, *extra: tiled_call(self.decoder, x, (z,), extra, tiling=self.tiling,
                                               factor=self.downsample_factor)

    def _tiled_posterior(self, x: torch.Tensor) -> Posterior:
        """The posterior of tiles blended in latent space (mean and log-variance alike)."""
        def moments(tile: torch.Tensor) -> torch.Tensor:
            q = self.encoder(tile)
            return q.mean if q.deterministic else torch.cat([q.mean, q.logvar], dim=1)

        f = self.downsample_factor
        out = tiled_call(moments, x, tiling=self.tiling, factor=f, out_factor=f)
        if out.shape[1] == self.latent_channels:
            return Posterior(out)
        return Posterior(*out.chunk(2, dim=1))

    # -- configuration and loading ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """JSON-able description; `DCSSDAE.from_config(ae.config())` rebuilds the same network."""
        return {
            **json.loads(json.dumps(self._config)),
            "corruption": corruption_config(self.corruption),
            "sampler": dict(self.sampler),
            "latent_scale": self.latent_scale,
            "latent_shift": self.latent_shift,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DCSSDAE:
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "encoder_pretrained"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown DCSSDAE config key(s) {unknown}; known: {sorted(known)}")
        sampler = config.get("sampler")
        if sampler and sampler.get("method") in DESCENT_METHODS and "schedule" not in sampler:
            # saved before step schedules existed: it was validated with a constant step
            config = {**config, "sampler": {**sampler, "schedule": "constant"}}
        elif sampler and sampler.get("method") in DESCENT_METHODS and sampler.get("schedule") == "noise":
            # saved when the noise schedule still carried an eta, which decoding ignored (the objective's step to the
            # data sets its steps)
            config = {**config, "sampler": {k: v for k, v in sampler.items() if k != "eta"}}
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DCSSDAE:
        """Load an export directory (`config.json` + `model.safetensors`, written by `dcssdae export`) or a
        Lightning `.ckpt` from `dcssdae fit` (its EMA weights; see `dcssdae.callbacks`)."""
        config, state = load_weights(path, map_location)
        model = cls.from_config(config)
        report = model.load_state_dict(state, strict=False)
        if report.missing_keys or report.unexpected_keys:
            raise ValueError(f"{path}: weights do not match the network of its config: missing "
                             f"{report.missing_keys[:10]}, unexpected {report.unexpected_keys[:10]}")
        return model.eval()


class WeightsFileError(ValueError):
    """A weights file that `load_weights` cannot read: truncated, corrupt, not a checkpoint, or holding Python
    objects other than weights. The original error is kept as `__cause__`."""


EXPECTED = ("expected a Lightning .ckpt written by `dcssdae fit`, or an export directory (config.json + "
            "model.safetensors) written by `dcssdae export`")


def _short_reason(error: BaseException) -> str:
    """The gist of a loader's error in one line (torch's weights-only refusal is a page long)."""
    text = str(error).strip()
    refused = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", text)
    if refused:
        return (f"it holds Python objects other than weights, which torch.load(weights_only=True) refuses to unpickle "
                f"({refused.group(1).strip()})")
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else f"{type(error).__name__} (truncated or empty file?)"


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(DCSSDAE config, DCSSDAE state dict) from an export directory or a Lightning checkpoint.

    Raises FileNotFoundError for a missing path and `WeightsFileError` (naming the file) for one that cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{path} is not a dcssdae export: {file.name} is missing (write one with "
                                        "`dcssdae export CKPT OUT`)")
        from safetensors.torch import load_file

        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise WeightsFileError(f"cannot read {config_file}: not valid JSON ({e}); {EXPECTED}") from e
        config.pop("export", None)  # metadata written by `dcssdae export` (source checkpoint, step, latent stats)
        try:
            return config, load_file(str(weights_file), device=str(map_location))
        except Exception as e:  # safetensors raises SafetensorError, OSError, ...
            raise WeightsFileError(f"cannot read {weights_file}: {_short_reason(e)}; {EXPECTED}") from e
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or export directory at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged zip or pickle fails in many ways: RuntimeError, KeyError, EOFError
        raise WeightsFileError(f"cannot read {path}: {_short_reason(e)}; {EXPECTED}") from e
    if not isinstance(checkpoint, dict) or "dcssdae_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by `dcssdae fit` (no 'dcssdae_config'/'state_dict')")
    state = {k[len("ae."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ae.")}
    return checkpoint["dcssdae_config"], state
