"""Training losses besides the objective's own MSE (`corruption.loss`): perceptual (LPIPS / ST-LPIPS), REPA, KL, and
the weights that combine them. Every term is returned by name; weights are applied in one place, `LossWeights`.

    terms = loss_terms(corruption, pred, target, x, x0_hat, perceptual=lpips, repa=repa, tokens=tokens,
                       posterior=posterior)        # {"eqm": ..., "lpips": ..., "repa": ..., "kl": ...}
    loss = weights.total(terms)

Frozen backbones (VGG / AlexNet for LPIPS, DINOv2 for REPA) are held *outside* the nn.Module tree (`_Frozen`): they
are not in `state_dict()` (no 60-330 MB of ImageNet weights in every checkpoint), not in `parameters()` (never seen
by the optimiser, weight decay or EMA), and `.train()` cannot switch them out of eval mode. They are built when first
needed (`load()`, which the system calls when training starts), not at construction, so that a checkpoint opens
without them, and follow the input's device. Pretrained weights come from the libraries' own loaders and caches
(torchvision's $TORCH_HOME/hub/checkpoints, the Hugging Face cache for timm) or from an explicit `weights_path`; when
neither has them (offline), the error names the file and where to put it. Set HF_HUB_OFFLINE=1 on offline machines: without it
the Hugging Face client retries for ~48 s before failing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# A frozen network kept out of the module tree.


class _Frozen:
    """Holds a frozen eval-mode network without registering it: invisible to state_dict, parameters, .to and .train.

    The network is built by `build()` on first use (`.net`), not at construction: a module holding it can be built,
    and its checkpoint loaded, on a machine without the network's weights; a missing file is reported when training
    starts (`load()` in the system's setup) or at the first forward. Moved to the input's device on use. Deep copies
    share the holder (the network never changes), so an EMA copy of the system does not duplicate it.
    """

    def __init__(self, build: Callable[[], nn.Module]):
        self._build, self._net = build, None

    @property
    def loaded(self) -> bool:
        return self._net is not None

    @property
    def net(self) -> nn.Module:
        if self._net is None:
            self._net = self._build().eval().requires_grad_(False)
        return self._net

    def to(self, device: torch.device) -> nn.Module:
        net = self.net
        if next(net.parameters()).device != device:
            net.to(device)
        return net

    def __deepcopy__(self, memo):
        return self


# ----------------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, Eq. 1) and ST-LPIPS (Ghildyal & Liu 2022), computed on x0_hat against x.

# torchvision ImageNet backbone files that `lpips` loads, by `net`.
_TORCHVISION_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _torchvision_file(net: str) -> tuple[str, Path]:
    """(url, expected cache path) of the torchvision backbone that lpips loads for `net`."""
    import torchvision

    url = getattr(torchvision.models, _TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _import_stlpips():
    """Import `stlpips_pytorch.stlpips`, which imports IPython and torchsummary at import time without declaring
    them: stand-in modules are put in sys.modules for the import only, when the real ones are not installed."""
    stubs = {}
    for name, attr in (("IPython", "embed"), ("torchsummary", "summary")):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stubs[name] = types.ModuleType(name)
            setattr(stubs[name], attr, lambda *args, **kwargs: None)
    sys.modules.update(stubs)
    try:
        return importlib.import_module("stlpips_pytorch.stlpips")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise over channels. lpips divides by (||f|| + eps), whose gradient is NaN where a feature vector is
    all zeros (sqrt'(0) = inf times 0); the eps inside the sqrt keeps it finite and changes values by < 1e-10."""
    return feat * torch.rsqrt(feat.square().sum(dim=1, keepdim=True) + eps)


class LPIPSLoss(nn.Module):
    """Perceptual distance between two image batches in [-1, 1]: (B,) per-sample values, differentiable in both.

    `variant="lpips"`: the `lpips` package (ImageNet VGG16 / AlexNet backbone from torchvision + the paper's linear
    heads, which ship in the wheel). `variant="stlpips"`: shift-tolerant LPIPS from the `stlpips-pytorch` wheel,
    whose trained backbone and heads ship in the wheel, so it works offline; its numbers are ST-LPIPS, not
    comparable with LPIPS values in papers, and its term is named `stlpips`.

    The backbone is built on first use or by `load()` (the system calls it when training starts), so constructing
    the loss needs no weights; a missing weights file is reported then.
    """

    def __init__(
        self,
        net: Literal["vgg", "alex", "squeeze"] = "vgg",
        variant: Literal["lpips", "stlpips"] = "lpips",
        weights_path: str | None = None,
        pretrained: bool = True,
    ):
        """
        Args:
            net: backbone. `vgg` for the training loss (SSDD), `alex` for the metric (LPIPS paper).
            variant: `lpips` (standard) or `stlpips` (shift-tolerant; `vgg` and `alex` only).
            weights_path: local weights. For `lpips`, the torchvision ImageNet backbone file (e.g.
                vgg16-397923af.pth); for `stlpips`, a full ST-LPIPS state dict (default: the one in the wheel).
            pretrained: False builds a random backbone (tests only; the lpips linear heads are still loaded).
        """
        super().__init__()
        if net not in _TORCHVISION_WEIGHTS:
            raise ValueError(f"unknown LPIPS net {net!r}; known: {', '.join(_TORCHVISION_WEIGHTS)}")
        if variant not in ("lpips", "stlpips"):
            raise ValueError(f"unknown LPIPS variant {variant!r}; known: lpips, stlpips")
        if variant == "stlpips" and net == "squeeze":
            raise ValueError("stlpips ships weights for net='vgg' and net='alex' only")
        self.name = variant
        self.net_name = net
        build = self._build_stlpips if variant == "stlpips" else self._build_lpips
        self._model = _Frozen(partial(build, net, weights_path, pretrained))

    def load(self) -> LPIPSLoss:
        """Build the frozen network now (it is otherwise built at the first forward); raises if its weights are
        missing. Returns self."""
        _ = self._model.net
        return self

    @staticmethod
    def _build_stlpips(net: str, weights_path: str | None, pretrained: bool) -> nn.Module:
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"ST-LPIPS weights_path {weights_path} does not exist")
        stlpips = _import_stlpips()
        return stlpips.LPIPS(net=net, variant="shift_tolerant", pretrained=pretrained, model_path=weights_path,
                             verbose=False)

    @staticmethod
    def _build_lpips(net: str, weights_path: str | None, pretrained: bool) -> nn.Module:
        import lpips

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"LPIPS weights_path {weights_path} does not exist")
        random_backbone = weights_path is not None or not pretrained
        try:
            with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation notice, raised inside lpips
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
        except OSError as error:  # URLError, no cache, no network
            url, cached = _torchvision_file(net)
            raise FileNotFoundError(
                f"LPIPS needs the torchvision ImageNet {net} backbone {cached.name}, which is not in the torch hub "
                f"cache and could not be downloaded ({error}). Download {url} and place it at {cached} "
                f"(the directory is $TORCH_HOME/hub/checkpoints), or pass weights_path=<that file>."
            ) from error
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            try:  # lpips splits torchvision's `features.N` into slices that keep the index: sliceK.N.weight
                backbone = {k: state[f"features.{k.split('.', 1)[1]}"] for k in model.net.state_dict()}
            except KeyError as error:
                raise ValueError(f"{weights_path} is not a torchvision {net} state dict (missing {error})") from None
            model.net.load_state_dict(backbone)
        return model

    def forward(self, x0_hat: Tensor, x: Tensor) -> Tensor:
        """Distance between x0_hat and x, both (B, 3, H, W) in [-1, 1]: shape (B,), float32."""
        return self.distances(x0_hat, x)[0]

    def distances(self, x0_hat: Tensor, *targets: Tensor) -> tuple[Tensor, ...]:
        """Distance from x0_hat to each target, all (B, 3, H, W) in [-1, 1]: one (B,) float32 tensor per target.

        Every image goes through the backbone in one pass, so x0_hat's features (and their backward) are computed
        once however many targets it is compared with (distillation compares the student's image with the teacher's
        and with the real image)."""
        if not targets:
            raise ValueError("LPIPS distances need at least one target batch")
        if any(t.shape != x0_hat.shape for t in targets) or x0_hat.ndim != 4 or x0_hat.shape[1] != 3:
            raise ValueError(f"LPIPS needs (B, 3, H, W) batches of one shape; got "
                             f"{', '.join(str(tuple(t.shape)) for t in (x0_hat, *targets))}")
        model = self._model.to(x0_hat.device)
        feats = model.net(model.scaling_layer(torch.cat([x0_hat, *targets]).float()))  # all images in one pass
        distances = [x0_hat.new_zeros(x0_hat.shape[0], dtype=torch.float32) for _ in targets]
        for feat, lin in zip(feats, model.lins):
            f0, *fs = _unit_normalize(feat.float()).chunk(1 + len(targets))
            for i, f in enumerate(fs):
                distances[i] = distances[i] + lin(torch.square(f0 - f)).mean(dim=(1, 2, 3))
        return tuple(distances)


# ----------------------------------------------------------------------------------------------------------------
# REPA (Yu et al. 2025, Eq. 8): align the decoder's middle tokens with frozen DINOv2 patch features of the clean image.


class REPALoss(nn.Module):
    """1 - cosine similarity between projected decoder tokens and DINOv2 patch features, averaged over tokens.

    Decoder tokens (B, N, D) come from `decoder(..., return_tokens_at=block)`; a trainable MLP
    Linear(D, hidden) - SiLU - Linear(hidden, E) maps them to the encoder's width E. The clean image is mapped to
    [0, 1], ImageNet-normalised and resized (bicubic, antialiased) to (gh * p, gw * p), p the encoder's patch size,
    so that its patch grid is the decoder's token grid gh x gw (gh * gw = N, gh / gw = H / W).

    Construction reads the encoder's shape (patch size, width, normalisation) from an empty (meta-device) copy and
    builds the projector; the encoder's weights load on first use or by `load()` (the system calls it when training
    starts), so a checkpoint holding the projector loads without them.
    """

    def __init__(
        self,
        token_dim: int,
        encoder: str = "vit_base_patch14_dinov2",
        block: int = 4,
        hidden_dim: int | None = None,
        pretrained: bool = True,
        weights_path: str | None = None,
        encoder_kwargs: dict | None = None,
    ):
        """
        Args:
            token_dim: width D of the decoder's middle-transformer tokens (the decoder's `mid_dim`).
            encoder: timm name of the frozen teacher. DINOv2-B (SSDD, REPA): vit_base_patch14_dinov2.
            block: index of the middle-transformer block whose output tokens are aligned (SSDD: 4, at most
                depth // 2); the system passes it to the decoder as `return_tokens_at`.
            hidden_dim: projector width; None uses token_dim (SSDD).
            pretrained: False builds a random encoder (tests only).
            weights_path: local encoder weights (timm's model.safetensors or Meta's DINOv2 .pth), instead of the
                Hugging Face cache.
            encoder_kwargs: extra timm.create_model arguments, e.g. {"depth": 2} for a small random encoder in tests.
        """
        super().__init__()
        import timm

        if not timm.is_model(encoder):
            raise ValueError(f"unknown timm encoder {encoder!r}; DINOv2 ones: {', '.join(timm.list_models('*dinov2*'))}")
        if token_dim < 1 or block < 0:
            raise ValueError(f"REPA needs token_dim >= 1 and block >= 0; got {token_dim}, {block}")
        self.block = block
        kwargs = dict(num_classes=0, dynamic_img_size=True, **(encoder_kwargs or {}))
        with torch.device("meta"):  # shapes and config only: no memory, no weights
            model = timm.create_model(encoder, pretrained=False, **kwargs)
        self.patch_size = model.patch_embed.patch_size[0]
        config = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        hidden_dim = hidden_dim or token_dim
        self.projector = nn.Sequential(
            nn.Linear(token_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, model.embed_dim)
        )
        self._encoder = _Frozen(partial(self._build_encoder, encoder, pretrained, weights_path, kwargs))

    def load(self) -> REPALoss:
        """Build the frozen encoder now (it is otherwise built at the first forward); raises if its weights are
        missing. Returns self."""
        _ = self._encoder.net
        return self

    @staticmethod
    def _build_encoder(name: str, pretrained: bool, weights_path: str | None, kwargs: dict) -> nn.Module:
        import timm

        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise FileNotFoundError(f"REPA weights_path {weights_path} does not exist")
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_path)}, **kwargs)
        if not pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as error:  # huggingface_hub LocalEntryNotFoundError, network errors
            from huggingface_hub import constants

            config = timm.models.get_pretrained_cfg(name)
            raise FileNotFoundError(
                f"REPA needs the {name} weights, Hugging Face repo {config.hf_hub_id} file "
                f"{config.hf_hub_filename or 'model.safetensors'}, which is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and could not be downloaded (offline: HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}). Run `huggingface-cli download {config.hf_hub_id}` "
                f"on a connected machine and copy the cache, or pass weights_path=<model.safetensors>."
            ) from error

    def _grid(self, num_tokens: int, height: int, width: int) -> tuple[int, int]:
        grid_h = round((num_tokens * height / width) ** 0.5)
        grid_w = num_tokens // max(grid_h, 1)
        if grid_h * grid_w != num_tokens or grid_h * width != grid_w * height:
            raise ValueError(f"{num_tokens} decoder tokens do not form a grid with the image's aspect {height}x{width}")
        return grid_h, grid_w

    @torch.no_grad()
    def features(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Frozen encoder patch features of the clean image x in [-1, 1]: (B, gh * gw, E), float32."""
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        image = F.interpolate((x.float() + 1) / 2, size=size, mode="bicubic", align_corners=False, antialias=True)
        encoder = self._encoder.to(x.device)
        tokens = encoder.forward_features((image - self.mean) / self.std)   # (B, prefix + N, E), final norm applied
        return tokens[:, encoder.num_prefix_tokens:].float()

    def forward(self, tokens: Tensor, x: Tensor) -> Tensor:
        """tokens (B, N, D) from the decoder, x (B, 3, H, W) the clean image: (B,) per-sample 1 - mean cosine."""
        if tokens.ndim != 3 or x.ndim != 4 or tokens.shape[0] != x.shape[0]:
            raise ValueError(f"REPA needs tokens (B, N, D) and images (B, 3, H, W); got {tuple(tokens.shape)}, "
                             f"{tuple(x.shape)}")
        target = self.features(x, self._grid(tokens.shape[1], x.shape[2], x.shape[3]))
        projected = self.projector(tokens).float()
        return 1 - F.cosine_similarity(projected, target, dim=-1, eps=1e-6).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# KL of the posterior to N(0, I) (Kingma & Welling 2014, Eq. 10), reduced as LDM / SSDD.


def kl_loss(posterior) -> Tensor:
    """Batch mean of the per-sample KL summed over all latent elements (posterior.kl(), shape (B,)): a scalar."""
    kl = posterior.kl()
    if kl.ndim != 1:
        raise ValueError(f"posterior.kl() must be per-sample, shape (B,); got {tuple(kl.shape)}")
    return kl.mean()


def lowpass_loss(x0_hat: Tensor, x: Tensor, blocks: tuple[int, ...] = (8, 16, 32)) -> Tensor:
    """Low frequencies (colour, tone) of x0_hat against x: the mean over block sizes b of the MSE between the b x b
    block averages of the two images (blocks larger than the image are skipped). The pixel MSE of the objective
    already holds these errors, but at a weight of one pixel each among all the detail the estimate cannot get
    right at high noise; this term weighs the block averages, which the latent keeps, on their own. Batch mean."""
    sizes = [b for b in blocks if b <= min(x.shape[-2:])]
    if not sizes:
        raise ValueError(f"lowpass_loss: every block size {blocks} exceeds the image ({tuple(x.shape[-2:])})")
    return sum(F.mse_loss(F.avg_pool2d(x0_hat.float(), b), F.avg_pool2d(x.float(), b)) for b in sizes) / len(sizes)


# ----------------------------------------------------------------------------------------------------------------
# Named terms and their weights (DC-SSDAE: L = EqM + 0.5 LPIPS + 0.25 REPA + 1e-6 KL).


def loss_terms(
    corruption,
    pred: Tensor,
    target: Tensor,
    x: Tensor,
    x0_hat: Tensor,
    *,
    perceptual: LPIPSLoss | None = None,
    repa: REPALoss | None = None,
    tokens: Tensor | None = None,
    posterior=None,
) -> dict[str, Tensor]:
    """The scalar (batch-mean) loss terms by name: the objective's MSE under `corruption.name` ("eqm" or "fm"),
    then `lpips` or `stlpips` (x0_hat against the reference x), `repa` (needs tokens), `kl` (needs a posterior).
    Terms whose module is None are left out."""
    terms = {corruption.name: corruption.loss(pred, target).mean()}
    if perceptual is not None:
        terms[perceptual.name] = perceptual(x0_hat, x).mean()
    if repa is not None:
        if tokens is None:
            raise ValueError("the REPA term needs the decoder's tokens (decoder(..., return_tokens_at=repa.block))")
        terms["repa"] = repa(tokens, x).mean()
    if posterior is not None:
        terms["kl"] = kl_loss(posterior)
    return terms


@dataclass
class LossWeights:
    """Weight of each named loss term; `total` sums weight * term over the terms given."""

    eqm: float = 1.0
    """Equilibrium Matching MSE."""
    fm: float = 1.0
    """Flow-matching MSE (the SSDD baseline)."""
    lpips: float = 0.5
    """LPIPS(x0_hat, x) (SSDD, DC-SSDAE)."""
    stlpips: float = 0.5
    """ST-LPIPS(x0_hat, x), the offline-trainable stand-in for LPIPS."""
    repa: float = 0.25
    """REPA alignment with DINOv2 (SSDD, DC-SSDAE)."""
    kl: float = 1e-6
    """KL of the posterior (DC-SSDAE errata: 1e-6)."""
    lowpass: float = 0.0
    """MSE of the block averages of x0_hat against x (`lowpass_loss`): colour and tone. Not in SSDD or DC-SSDAE
    (0 by default)."""
    distill: float = 1.0
    """One-step distillation: the objective's loss at the pure-noise level between the student's one-step prediction
    and the target built from the teacher's N-step sample (SSDD Sec. 3.4; `dcssdae.distill.DistillSystem`)."""
    data: float = 0.0
    """One-step distillation: the configured perceptual distance (lpips or stlpips) between the student's image and
    the real image (`dcssdae.distill.DistillSystem`)."""

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """sum_k weight_k * terms[k]; every term needs a weight and must be a scalar."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(terms) - known)
        if unknown:
            raise KeyError(f"loss term(s) {unknown} have no weight; LossWeights has: {', '.join(sorted(known))}")
        if not terms:
            raise ValueError("no loss terms to combine")
        for name, value in terms.items():
            if value.ndim != 0:
                raise ValueError(f"loss term {name!r} must be a scalar; got shape {tuple(value.shape)}")
        return sum(getattr(self, name) * value for name, value in terms.items())
