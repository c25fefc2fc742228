"""The parts of the GPU-recipe rehearsal (benchmarks/rehearsal.py) that run inside torch processes: `StepProbe`, the
callback that measures a real training run from inside it; `CudaAutocastPolicy`, which makes the CPU's bf16 autocast
store activations in the dtypes CUDA's autocast stores them; and the random stand-in weight files for the frozen
loss and metric networks, written where their loaders look.

    dcssdae fit --config configs/phase1.yaml ... --trainer.callbacks+=benchmarks.rehearsal_probe.StepProbe
    python -m benchmarks.rehearsal_probe standins FOLDER        # prints the environment that points at FOLDER

Run from the repository root (the command line names the callback by its module path).

What StepProbe measures, written to <run folder>/rehearsal_probe.json after every training step:
  * flops_per_image: torch.utils.flop_counter.FlopCounterMode over the first step's forward and backward (matmuls,
    convolutions, attention; the frozen LPIPS / DINOv2 / teacher passes included, the optimiser update not), divided
    by the batch.
  * saved activations: every tensor autograd saves for backward during the first step's forward
    (saved_tensors_hooks), counted once per storage in its own dtype. A tensor with the shape of a parameter (a
    weight, or its bf16 copy under autocast) is counted per step (`saved_per_step_bytes`), every other one per
    image (`saved_per_image_bytes`, divided by the batch).
  * peak_rss_delta_bytes: the process's peak resident set size over the steps so far (VmHWM, reset through
    /proc/self/clear_refs before the first step) minus its RSS before the first step: gradients, AdamW moments,
    activations and working memory at the run's batch, on the CPU.
  * memory_bytes: what the run keeps between steps (`memory_inventory`), and init_from's report (tensors loaded,
    missing, unexpected).
Every step runs under `CudaAutocastPolicy`, so that under bf16-mixed the saved activations have the dtypes a CUDA run
gives them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.rehearsal import PROBE_FILE, standin_env

# ----------------------------------------------------------------------------------------------------------------
# Stand-in weights for the frozen loss and metric networks, in the caches their loaders read.


TORCHVISION_STANDINS = ("vgg16", "alexnet")        # the LPIPS loss's backbone, the LPIPS metric's backbone
TIMM_STANDINS = ("vit_base_patch14_dinov2",)        # REPA's encoder (DINOv2-B)


def write_standin_weights(folder: Path, torchvision_models: tuple[str, ...] = TORCHVISION_STANDINS,
                          timm_models: tuple[str, ...] = TIMM_STANDINS, seed: int = 0) -> dict[str, str]:
    """Randomly initialised weight files, written where the real ones are looked up: torchvision ImageNet models
    under their download names in <folder>/torch/hub/checkpoints (TORCH_HOME), timm models as their Hugging Face
    repos in the hub cache <folder>/hf/hub (refs/main -> snapshots/<revision>/model.safetensors). Returns the
    environment that points the loaders there."""
    import safetensors.torch
    import timm
    import torchvision

    torch.manual_seed(seed)
    hub = folder / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    for name in torchvision_models:
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), hub / url.rsplit("/", 1)[-1])
    for name in timm_models:
        repo = folder / "hf" / "hub" / ("models--" + timm.models.get_pretrained_cfg(name).hf_hub_id.replace("/", "--"))
        revision = "0" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                    str(repo / "snapshots" / revision / "model.safetensors"))
    return standin_env(folder)


# ----------------------------------------------------------------------------------------------------------------
# The probe: FLOPs, saved activations and peak RSS of a real run's training steps, from inside it.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _outside_networks(pl_module) -> list[torch.nn.Module]:
    """The frozen networks held outside the module tree (dcssdae.losses._Frozen): LPIPS's backbone, DINOv2."""
    nets = []
    for loss, holder in (("lpips", "_model"), ("repa", "_encoder")):
        frozen = getattr(getattr(pl_module, loss, None), holder, None)
        if frozen is not None and frozen.loaded:
            nets.append(frozen.net)
    return nets


def memory_inventory(pl_module) -> dict[str, int]:
    """Bytes of what a training run keeps between steps (in the CPU run's dtypes, fp32): `weights` (the autoencoder's
    parameters and buffers, and trained heads such as REPA's projector), `frozen` (every other network: LPIPS,
    DINOv2, a distillation teacher, the validation metrics' Inception and AlexNet), `trained` (the parameters the
    optimiser updates: their gradients and AdamW moments have this size each) and `ema` (the EMA copy of the
    autoencoder's floating tensors). Tensors that share storage are counted once."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    trained = [p for _, p in pl_module.trained_parameters()]
    weights = nbytes([*pl_module.ae.parameters(), *pl_module.ae.buffers(), *trained])
    frozen = nbytes([*pl_module.parameters(), *pl_module.buffers()]
                    + [t for net in _outside_networks(pl_module) for t in (*net.parameters(), *net.buffers())])
    ema = sum(t.numel() * t.element_size() for t in pl_module.ae.state_dict().values() if t.is_floating_point())
    return {"weights": weights, "frozen": frozen, "trained": sum(p.numel() * p.element_size() for p in trained),
            "ema": ema}


# CUDA's autocast runs these in fp32 (ATen's AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE lists: norms,
# softmax, losses, pow / exp / rsqrt, sums, upsampling); the CPU's autocast leaves them in bf16. So that the
# rehearsal stores its activations in the dtypes a GPU run stores them (e.g. a GroupNorm's fp32 output, and the bf16
# copy that the next convolution saves), `CudaAutocastPolicy` casts their bf16 inputs to fp32 under CPU autocast.
_F = torch.nn.functional
CUDA_FP32_FUNCTIONS = {
    _F.group_norm, _F.layer_norm, _F.rms_norm, _F.softmax, _F.log_softmax, _F.mse_loss, _F.l1_loss,
    _F.smooth_l1_loss, _F.cosine_similarity, _F.softplus, _F.interpolate,
    torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp,
    torch.log, torch.Tensor.log, torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
    torch.reciprocal, torch.Tensor.reciprocal, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum,
    torch.logsumexp, torch.Tensor.logsumexp, torch.linalg.vector_norm, torch.norm, torch.Tensor.norm,
    torch.square, torch.Tensor.square,
}


class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """Under CPU bf16 autocast, run CUDA_FP32_FUNCTIONS in fp32, as CUDA's autocast does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

            args, kwargs = torch.utils._pytree.tree_map(up, (args, kwargs))
        return func(*args, **kwargs)


class StepProbe(pl.Callback):
    """Measures a run's training steps from inside it (see the module docstring) and writes
    <default_root_dir>/rehearsal_probe.json after each step. Runs every step under `CudaAutocastPolicy`; otherwise it
    only observes. Added to a run with `--trainer.callbacks+=benchmarks.rehearsal_probe.StepProbe`."""

    def __init__(self) -> None:
        self.steps, self.flops, self.saved, self.policy = [], None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.policy = CudaAutocastPolicy()
        self.t0 = time.perf_counter()
        if self.steps:
            self.policy.__enter__()
            return
        # F.sdpa's CPU kernel, which the counter does not know
        from benchmarks.bench_networks import CPU_ATTENTION_FLOPS

        self.batch = int(batch["image"].shape[0])
        self.shapes = {tuple(t.shape) for t in (*pl_module.parameters(), *pl_module.buffers())}
        self.shapes |= {tuple(p.shape) for net in _outside_networks(pl_module) for p in net.parameters()}
        self.storages, self.per_step, self.per_image = set(), 0, 0
        self.reset_ok = _reset_peak_rss()
        self.rss0 = _rss_bytes()
        self.flops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        self.flops.__enter__()
        self.saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.saved.__enter__()
        self.policy.__enter__()

    def _pack(self, t):
        """Count a tensor saved for backward once per storage: per step if it has a parameter's shape (a weight, or
        its bf16 copy), else per image."""
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self.storages:
            self.storages.add(key)
            if tuple(t.shape) in self.shapes:
                self.per_step += storage.nbytes()
            else:
                self.per_image += storage.nbytes()
        return t

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.saved is not None:  # the forward is over: nothing more is saved
            self.saved.__exit__(None, None, None)
            self.saved = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.flops is not None:
            self.flops.__exit__(None, None, None)
            self.total_flops, self.flops = self.flops.get_total_flops(), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.policy.__exit__(None, None, None)
        self.on_before_backward(trainer, pl_module, None)  # (a step with no backward or no optimiser step)
        self.on_before_optimizer_step(trainer, pl_module, None)
        self.steps.append({"seconds": round(time.perf_counter() - self.t0, 2),
                           "peak_rss_delta_bytes": _peak_rss_bytes() - self.rss0 if self.reset_ok else None})
        result = {
            "batch": self.batch,
            "image_size": int(batch["image"].shape[-1]),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "params": sum(p.numel() for p in pl_module.ae.parameters()),
            "trainable_params": sum(p.numel() for _, p in pl_module.trained_parameters()),
            "memory_bytes": memory_inventory(pl_module),
            "flops_per_image": self.total_flops / self.batch,
            "saved_per_step_bytes": self.per_step,
            "saved_per_image_bytes": self.per_image / self.batch,
            "peak_rss_delta_bytes": self.steps[-1]["peak_rss_delta_bytes"],
            "steps": self.steps,
            "init_from": getattr(pl_module, "init_report", None),  # what init_from loaded (None: no init_from)
        }
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / PROBE_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            print(f"\nrehearsal probe, step {len(self.steps)}: {json.dumps(result)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "standins":
        print("usage: python -m benchmarks.rehearsal_probe standins FOLDER", file=sys.stderr)
        return 2
    print(json.dumps(write_standin_weights(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
