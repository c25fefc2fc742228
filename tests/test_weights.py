"""The real-weight loading paths, exercised with files of the published format placed where the libraries look.

The pretrained networks of the GPU recipes cannot be downloaded here, so random weights are saved in the published
layout (torchvision's state-dict keys and file names in $TORCH_HOME/hub/checkpoints; the Hugging Face hub cache
layout models--timm--<name>/refs/main + snapshots/<rev>/model.safetensors for timm) and the loaded networks must
hold exactly those weights: a renamed key or a wrong cache path fails here. Also: a phase-1 system (LPIPS + REPA on)
is built and reloaded from a checkpoint without any of those files; the missing file is named when fit starts.
"""

import json
import urllib.error

import pytest
import torch

from dcssdae.losses import LossWeights, LPIPSLoss, REPALoss
from dcssdae.metrics import ReconstructionMetrics

REVISION = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: refs/main points at it


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches under tmp_path; any download attempt fails as it would offline."""
    from huggingface_hub import constants

    torch_home, hf_home = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return {"torch_checkpoints": torch_home / "hub" / "checkpoints", "hf_hub": hf_home / "hub"}


def _random_state(module: torch.nn.Module, seed: int, only: str = "") -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of `module`'s state dict (built on the meta device). Names not
    starting with `only` get a broadcast zero (no memory, no file size): the classifier heads lpips never uses."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if k.startswith(only) else torch.zeros(()).expand(v.shape)
            for k, v in module.state_dict().items()}


def _place_torchvision(directory, filename: str, builder, seed: int) -> dict[str, torch.Tensor]:
    """torchvision's published file: the full model state dict, saved under its URL's file name."""
    with torch.device("meta"):
        model = builder()
    state = _random_state(model, seed, only="features.")
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / filename)
    return state


def _assert_lpips_backbone(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """lpips keeps torchvision's `features.N` as `sliceK.N`: every slice tensor equals the placed one."""
    loaded = net.state_dict()
    assert len(loaded) == sum(k.startswith("features.") for k in state)
    for key, value in loaded.items():
        assert torch.equal(value, state["features." + key.split(".", 1)[1]]), key


def test_vgg_lpips_loss_loads_the_torchvision_file_from_torch_home(offline):
    import torchvision

    state = _place_torchvision(offline["torch_checkpoints"], "vgg16-397923af.pth", torchvision.models.vgg16, seed=1)
    loss = LPIPSLoss(net="vgg", variant="lpips")
    assert not loss._model.loaded  # nothing loads at construction
    loss.load()
    _assert_lpips_backbone(loss._model.net.net, state)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isfinite(loss(x.flip(0), x)).all()


def test_alexnet_lpips_metric_loads_the_torchvision_file_from_torch_home(offline):
    import torchvision

    state = _place_torchvision(offline["torch_checkpoints"], "alexnet-owt-7be5be79.pth", torchvision.models.alexnet,
                               seed=2)
    metrics = ReconstructionMetrics(rfid=False, lpips_variant="lpips")
    assert len(metrics.perceptual) == 0 and metrics.perceptual_name == "lpips"  # nothing loads at construction
    metrics.load()
    _assert_lpips_backbone(metrics.perceptual["lpips"].net, state)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    metrics.update(x.flip(0), x)
    assert metrics.compute()["lpips"] > 0


def _place_hf_snapshot(hub, repo_id: str, files: dict[str, bytes]) -> None:
    """The huggingface_hub cache layout: models--{org}--{name}/refs/main holds the revision, snapshots/<rev>/ the
    files (the hub client symlinks them to blobs/; plain files are read the same way)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)


def test_repa_dinov2_loads_from_the_hugging_face_cache(offline):
    from safetensors.torch import save

    # The default encoder's name and Hugging Face repo, two of its twelve blocks (same keys, same loading code).
    name, kwargs = "vit_base_patch14_dinov2", {"depth": 2}
    with torch.device("meta"):
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    assert model.pretrained_cfg["hf_hub_id"] == "timm/vit_base_patch14_dinov2.lvd142m"
    state = _random_state(model, seed=3)
    config = {"architecture": name, "num_classes": 0, "pretrained_cfg": {"tag": "lvd142m"}}
    _place_hf_snapshot(offline["hf_hub"], "timm/vit_base_patch14_dinov2.lvd142m",
                       {"model.safetensors": save(state), "config.json": json.dumps(config).encode()})

    repa = REPALoss(token_dim=16, encoder=name, block=1, encoder_kwargs=kwargs)
    assert not repa._encoder.loaded
    loaded = repa.load()._encoder.net.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert repa(torch.randn(2, 4, 16), torch.rand(2, 3, 28, 28) * 2 - 1).shape == (2,)


def test_missing_files_are_named_when_loading(offline):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPSLoss(net="vgg").load()
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        ReconstructionMetrics(rfid=False, lpips_variant="lpips").load()
    with pytest.raises(FileNotFoundError, match="timm/vit_base_patch14_dinov2.lvd142m"):
        REPALoss(token_dim=8, encoder_kwargs={"depth": 1}).load()


def test_phase1_system_opens_offline_and_names_the_missing_file_at_fit(offline, tmp_path):
    import lightning
    import lightning.pytorch as pl

    from dcssdae.system import DCSSDAESystem

    model = DCSSDAESystem(encoder="tiny-f8c4", decoder="tiny", loss_weights=LossWeights(lpips=0.5, repa=0.25),
                          lpips_variant="lpips", lpips_net="vgg", val_rfid=False, val_lpips="lpips")
    assert model.lpips is not None and model.repa is not None and not model.repa._encoder.loaded
    state = model.state_dict()
    assert any(k.startswith("repa.projector.") for k in state)  # the trained REPA head is in the checkpoint
    path = tmp_path / "phase1.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)

    loaded = DCSSDAESystem.load_from_checkpoint(path)
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key

    images = [{"image": torch.zeros(3, 16, 16), "label": 0, "key": "a"}]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        trainer.fit(loaded, train_dataloaders=torch.utils.data.DataLoader(images, batch_size=1))
