"""Losses with random or packaged backbones: LPIPS (random squeeze/alex trunks), ST-LPIPS (trained weights from its
wheel), REPA (random timm DINOv2), KL, the named terms and their weights, and the missing-weights errors."""

import copy
import urllib.error

import pytest
import torch

from dcssdae.losses import LossWeights, LPIPSLoss, REPALoss, kl_loss, loss_terms, lowpass_loss
from dcssdae.objectives import EquilibriumMatching, FlowMatching


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def lpips_random():
    return LPIPSLoss(net="squeeze", pretrained=False)  # random trunk, the paper's linear heads from the wheel


@pytest.fixture(scope="module")
def repa_random():
    torch.manual_seed(0)
    return REPALoss(token_dim=24, encoder="vit_small_patch14_dinov2", block=1, pretrained=False,
                    encoder_kwargs={"depth": 2})


# ----------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_matches_the_package_and_is_a_distance(lpips_random):
    x, y = _images(seed=0), _images(seed=1)
    distance = lpips_random(x, y)
    assert distance.shape == (2,) and distance.dtype == torch.float32
    torch.testing.assert_close(distance, lpips_random._model.net(x, y).flatten(), rtol=1e-4, atol=1e-6)
    assert (distance > 0).all()
    torch.testing.assert_close(lpips_random(x, x), torch.zeros(2), atol=1e-7, rtol=0)
    torch.testing.assert_close(lpips_random(y, x), distance, rtol=1e-5, atol=1e-7)


def test_lpips_gradient_is_finite_and_reaches_x0_hat(lpips_random):
    x = _images()
    x0_hat = x.clone().requires_grad_(True)  # identical images: the lpips package's normalisation gives NaN here
    lpips_random(x0_hat, x).sum().backward()
    assert torch.isfinite(x0_hat.grad).all()
    x0_hat = _images(seed=3).requires_grad_(True)
    lpips_random(x0_hat, x).sum().backward()
    assert x0_hat.grad.abs().sum() > 0


def test_lpips_distances_to_several_targets_in_one_pass(lpips_random):
    """distances(x0_hat, a, b) (distillation: the student's image against the teacher's and the real one) equals
    two separate calls, value and gradient, with x0_hat through the backbone once; shape mismatches are named."""
    x0_hat, a, b = _images(seed=4).requires_grad_(True), _images(seed=5), _images(seed=6)
    separate = (lpips_random(x0_hat, a), lpips_random(x0_hat, b))
    (grad,) = torch.autograd.grad(separate[0].sum() + 2 * separate[1].sum(), x0_hat)
    batches = []
    handle = lpips_random._model.net.net.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    try:
        together = lpips_random.distances(x0_hat, a, b)
    finally:
        handle.remove()
    assert batches == [3 * len(a)]  # one backbone pass over x0_hat, a and b
    for s, t in zip(separate, together, strict=True):
        torch.testing.assert_close(t, s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(together[0].sum() + 2 * together[1].sum(), x0_hat)[0], grad,
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"one shape; got \(2, 3, 32, 32\), \(2, 3, 32, 32\), \(1, 3, 32, 32\)"):
        lpips_random.distances(x0_hat, a, b[:1])
    with pytest.raises(ValueError, match="at least one target"):
        lpips_random.distances(x0_hat)


def test_lpips_backbone_is_out_of_the_module_tree(lpips_random):
    assert list(lpips_random.parameters()) == [] and lpips_random.state_dict() == {}
    system = torch.nn.ModuleDict({"lpips": lpips_random, "head": torch.nn.Linear(2, 2)})
    assert set(system.state_dict()) == {"head.weight", "head.bias"}
    system.train()
    assert not lpips_random._model.net.training  # stays in eval mode (the heads have dropout)
    x, y = _images(seed=0), _images(seed=1)
    torch.testing.assert_close(lpips_random(x, y), lpips_random(x, y))
    assert copy.deepcopy(system)["lpips"]._model.net is lpips_random._model.net  # EMA copies share it


def test_lpips_missing_backbone_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    with pytest.raises(FileNotFoundError) as error:
        LPIPSLoss(net="squeeze").load()
    assert str(expected) in str(error.value) and "weights_path" in str(error.value)


def test_lpips_weights_path_loads_a_torchvision_backbone(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.squeezenet1_1()
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(reference.state_dict(), path)
    loss = LPIPSLoss(net="squeeze", weights_path=str(path))
    expected = reference.state_dict()
    loaded = loss._model.net.net.state_dict()  # sliceK.N.* holds torchvision's features.N.*
    assert len(loaded) == sum(k.startswith("features.") for k in expected)
    for key, value in loaded.items():
        assert torch.equal(value, expected["features." + key.split(".", 1)[1]]), key
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="is not a torchvision squeeze state dict"):
        LPIPSLoss(net="squeeze", weights_path=str(path)).load()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPSLoss(net="squeeze", weights_path=str(tmp_path / "missing.pth")).load()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"net": "resnet"}, "unknown LPIPS net 'resnet'; known: vgg, alex, squeeze"),
     ({"variant": "dists"}, "unknown LPIPS variant 'dists'"),
     ({"net": "squeeze", "variant": "stlpips"}, "net='vgg' and net='alex' only")],
)
def test_lpips_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LPIPSLoss(**kwargs)


def test_stlpips_trained_weights_offline():
    loss = LPIPSLoss(net="alex", variant="stlpips")  # trained weights ship in the stlpips-pytorch wheel
    assert loss.name == "stlpips" and loss.state_dict() == {}
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 52, 52, generator=g) * 2 - 1, 3, 1)[..., :48, :48]
    assert loss(x, x).abs().max() < 1e-6
    shifted = torch.roll(x, shifts=1, dims=-1)
    noisy = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (loss(shifted, x) < loss(noisy, x)).all()  # shift-tolerant: a 1-px shift is closer than noise
    torch.testing.assert_close(loss(noisy, x), loss._model.net(noisy, x).flatten(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# REPA


def test_repa_loss_is_one_minus_mean_cosine(repa_random):
    x = _images(b=2, size=32)
    tokens = torch.randn(2, 16, 24, requires_grad=True)  # a 4 x 4 grid -> DINOv2 input 56 x 56
    loss = repa_random(tokens, x)
    assert loss.shape == (2,) and ((loss >= 0) & (loss <= 2)).all()
    target = repa_random.features(x, (4, 4))
    assert target.shape == (2, 16, 384)
    expected = 1 - torch.nn.functional.cosine_similarity(repa_random.projector(tokens), target, dim=-1).mean(1)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in repa_random.projector.parameters())


def test_repa_state_dict_holds_only_the_projector(repa_random):
    assert set(repa_random.state_dict()) == {"projector.0.weight", "projector.0.bias", "projector.2.weight",
                                             "projector.2.bias"}
    assert repa_random.block == 1
    assert all(not p.requires_grad for p in repa_random._encoder.net.parameters())


def test_repa_non_square_grid_and_errors(repa_random):
    x = _images(b=2, size=32)[..., :16, :]  # 16 x 32 image, 2 x 4 token grid
    assert repa_random(torch.randn(2, 8, 24), x).shape == (2,)
    with pytest.raises(ValueError, match="do not form a grid"):
        repa_random(torch.randn(2, 7, 24), x)
    with pytest.raises(ValueError, match="tokens"):
        repa_random(torch.randn(2, 8), x)
    with pytest.raises(ValueError, match="unknown timm encoder 'dino_v9'"):
        REPALoss(token_dim=8, encoder="dino_v9")


def test_repa_missing_weights_error_names_the_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as error:
        REPALoss(token_dim=8, encoder="vit_small_patch14_dinov2", encoder_kwargs={"depth": 2}).load()
    assert "timm/vit_small_patch14_dinov2.lvd142m" in str(error.value) and "weights_path" in str(error.value)


def test_repa_weights_path(tmp_path, repa_random):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in repa_random._encoder.net.state_dict().items()}, str(path))
    loaded = REPALoss(token_dim=24, encoder="vit_small_patch14_dinov2", weights_path=str(path),
                      encoder_kwargs={"depth": 2})
    x = _images()
    torch.testing.assert_close(loaded.features(x, (4, 4)), repa_random.features(x, (4, 4)))


# ----------------------------------------------------------------------------------------------------------------
# KL, named terms, weights


class _Posterior:
    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


def test_kl_loss_is_batch_mean_of_per_sample_sums():
    from dcssdae.encoders import Posterior

    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(kl_loss(Posterior(mean, logvar)), expected)
    with pytest.raises(ValueError, match="per-sample"):
        kl_loss(_Posterior(torch.zeros(3, 4)))


def test_loss_terms_are_named(lpips_random, repa_random):
    x, noise = _images(), torch.randn(2, 3, 32, 32)
    for corruption in (EquilibriumMatching(), FlowMatching()):
        level = corruption.sample_level(x)
        x_t = corruption.corrupt(x, noise, level)
        target = corruption.target(x, noise, level)
        pred = target + 0.1
        terms = loss_terms(corruption, pred, target, x, corruption.to_x0(x_t, pred, level), perceptual=lpips_random,
                           repa=repa_random, tokens=torch.randn(2, 16, 24), posterior=_Posterior(torch.ones(2)))
        assert list(terms) == [corruption.name, "lpips", "repa", "kl"]
        assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
        torch.testing.assert_close(terms[corruption.name], torch.tensor(0.01))
        assert LossWeights().total(terms).ndim == 0
    assert list(loss_terms(EquilibriumMatching(), pred, target, x, x)) == ["eqm"]
    with pytest.raises(ValueError, match="needs the decoder's tokens"):
        loss_terms(EquilibriumMatching(), pred, target, x, x, repa=repa_random)


def test_loss_weights():
    weights = LossWeights()
    assert (weights.eqm, weights.lpips, weights.repa, weights.kl) == (1.0, 0.5, 0.25, 1e-6)
    terms = {"eqm": torch.tensor(2.0), "lpips": torch.tensor(0.4), "repa": torch.tensor(0.8), "kl": torch.tensor(1e3)}
    torch.testing.assert_close(weights.total(terms), torch.tensor(2.0 + 0.2 + 0.2 + 1e-3))
    torch.testing.assert_close(LossWeights(lpips=0.0).total({"lpips": torch.tensor(3.0)}), torch.tensor(0.0))
    with pytest.raises(KeyError, match=r"\['gan'\] have no weight; LossWeights has: data, distill, eqm, fm, kl, lowpass, lpips, repa, stlpips"):
        weights.total({"eqm": torch.tensor(1.0), "gan": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="must be a scalar"):
        weights.total({"eqm": torch.ones(2)})


def test_lowpass_loss_sees_colour_and_tone_not_detail():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    detail = x + 0.5 * torch.tensor([1.0, -1.0]).repeat(32).view(1, 1, 1, 64)  # +-0.5 on alternate columns
    tinted = x + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1)
    assert lowpass_loss(x, x) == 0 and lowpass_loss(detail, x) < 1e-10  # block averages of the detail cancel
    assert lowpass_loss(tinted, x).item() == pytest.approx(2 * 0.1**2 / 3, rel=1e-4)
    assert lowpass_loss(x[..., :16, :16], x[..., :16, :16] + 0.1).item() == pytest.approx(0.01, rel=1e-4)  # 8, 16
    with pytest.raises(ValueError, match="exceeds the image"):
        lowpass_loss(x[..., :4, :4], x[..., :4, :4])
    assert LossWeights().lowpass == 0 and LossWeights(lowpass=2.0).total({"lowpass": torch.tensor(0.5)}) == 1.0
