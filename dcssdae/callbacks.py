"""Training callbacks: EMA of the autoencoder weights, a grid of reconstructions, images/s.

Where the weights live in a `.ckpt` written during `dcssdae fit` (read by `dcssdae export`,
`--model.init_from` and `DCSSDAE.from_pretrained`):

- `checkpoint["state_dict"]`: the LightningModule state dict. Its `ae.*` entries ARE the EMA weights
  (keys `ae.encoder.*`, `ae.decoder.*`), so `load_from_checkpoint`, `dcssdae validate --ckpt_path`,
  `init_from` and exports all see the EMA model. Other entries (a distillation teacher, loss heads) are live.
- `checkpoint["current_model_state"]`: the live training weights (same keys); used only to resume
  (`dcssdae fit --ckpt_path`). Absent when the run has no EMA (`--ema.decay 0`), in which case
  `state_dict` holds the live weights.
- `checkpoint["callbacks"]["EMA"]`: `{"num_updates", "decay", "start_step"}`.
  Both hold what they name in every checkpoint, the end-of-run one included (after `fit` the module holds the EMA
  weights, and the live ones are kept aside for it and for a later `fit`).
- `checkpoint["dcssdae_config"]`: `DCSSDAE.config()`, the JSON-able dict that rebuilds the network
  (`DCSSDAE.from_config`); written by `DCSSDAESystem.on_save_checkpoint`.

This is the layout of Lightning's own `WeightAveraging` callback, restricted to what trains: the EMA averages the
autoencoder's trainable parameters (and floating buffers); a frozen weight is its own average, so the EMA model's
frozen entries are the module's own (a frozen encoder, a distillation teacher, LPIPS and DINOv2 are not copied).
Checkpoints written when the EMA averaged every autoencoder weight have the same layout and load the same way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

# ------------------------------------------------------------------------------------------------
# Exponential moving average of the autoencoder weights (SSDD: decay 0.999, start at 50k steps,
# warm-up min(decay, (1+n)/(10+n)) as in timm/LitEma).


class EMA(Callback):
    """EMA of `pl_module.ae`'s trainable parameters and floating buffers, swapped in for validation and saved (with
    the frozen weights) as the checkpoint's `state_dict` (see the module docstring)."""

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1) -> None:
        """
        Args:
            decay: EMA decay per update (SSDD 0.999, EqM 0.9999). 0 turns the EMA off.
            start_step: before this optimiser step the EMA simply follows the live weights (decay 0).
            every_n_steps: update the EMA every N optimiser steps.

        Under gradient accumulation (`trainer.accumulate_grad_batches`) the EMA updates once per optimiser step,
        not per micro-batch: its warm-up and `start_step` count optimiser steps.
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self.num_updates = 0  # updates since start_step (drives the warm-up)
        self.ema: list[torch.Tensor] | None = None  # aligned with _live_tensors(pl_module)
        self._loaded: dict[str, torch.Tensor] | None = None  # EMA read from a checkpoint before setup
        self._swapped = False  # the module holds the EMA (validation, after fit), self.ema the live weights
        self._swapped_for_validation = False
        self._last_step: int | None = None  # trainer.global_step at the last update check

    @property
    def state_key(self) -> str:
        return "EMA"

    @staticmethod
    def _live(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The entries the EMA averages: the autoencoder's trainable parameters and floating buffers (state-dict
        names; the tensors share memory with the module)."""
        state = pl_module.ae.state_dict(keep_vars=True)
        return {name: t.detach() for name, t in state.items()
                if t.is_floating_point() and (t.requires_grad or not isinstance(t, torch.nn.Parameter))}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay == 0 or self.ema is not None:
            return
        live = self._live(pl_module)
        source = self._loaded or live
        self.ema = [source[name].detach().to(t.device, t.dtype, copy=True) for name, t in live.items()]
        self._loaded = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.ema is not None and self._swapped:  # a second fit of the same module: the live weights back in
            self._swap(pl_module)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps taken so far
        if self.ema is None or step == self._last_step:  # no optimiser step since the last call (accumulating)
            return
        self._last_step = step
        if step % self.every_n_steps:
            return
        live = list(self._live(pl_module).values())
        if step < self.start_step:
            decay = 0.0
        else:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, live, 1.0 - decay)  # ema <- decay*ema + (1-decay)*live

    def _swap(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for ema, live in zip(self.ema, self._live(pl_module).values()):
                tmp = live.clone()
                live.copy_(ema)
                ema.copy_(tmp)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.ema is not None and not self._swapped:
            self._swap(pl_module)
            self._swapped_for_validation = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped_for_validation:
            self._swap(pl_module)
            self._swapped_for_validation = False

    def on_train_end(self, trainer, pl_module) -> None:
        # Like Lightning's WeightAveraging: after fit the module holds the averaged weights. The live ones are kept
        # (swapped, not overwritten), so that a checkpoint written now still resumes from them.
        if self.ema is not None and not self._swapped:
            self._swap(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "decay": self.decay, "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:
            return
        module_state = checkpoint["state_dict"]
        other = dict(module_state)
        for name, ema in zip(self._live(pl_module), self.ema):
            other["ae." + name] = ema
        # Saved during validation (a pre-emption checkpoint): the module holds the EMA, self.ema the live weights.
        live_state, averaged = (other, module_state) if self._swapped else (module_state, other)
        checkpoint["current_model_state"] = live_state
        checkpoint["state_dict"] = averaged

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.decay == 0 or "current_model_state" not in checkpoint:
            return  # no EMA in the checkpoint: the EMA starts from the loaded (live) weights
        if trainer.state.fn != "fit":
            return  # validate / test / predict evaluate the EMA weights, which the module was restored with
        loaded = {k[3:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ae.")}
        pl_module.load_state_dict(checkpoint["current_model_state"])  # the model was restored with EMA
        self._swapped = False  # the module holds the live weights now (also after an earlier fit in this process)
        if self.ema is None:
            self._loaded = loaded
        else:
            with torch.no_grad():
                for ema, name in zip(self.ema, self._live(pl_module)):
                    ema.copy_(loaded[name])


# ------------------------------------------------------------------------------------------------
# Inputs over reconstructions, logged at each validation (TensorBoard / W&B) and saved as PNG.


class ReconstructionGrid(Callback):
    """Keeps the first validation batch's inputs `x` and reconstructions `x_hat` (returned by
    `validation_step`) and writes a two-row grid: inputs on top, reconstructions below."""

    def __init__(self, num_images: int = 8, save_png: bool = True) -> None:
        """
        Args:
            num_images: images per row.
            save_png: also write `<log_dir>/reconstructions/step_XXXXXXX.png` (and `latest.png`).
        """
        self.num_images, self.save_png = num_images, save_png
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(outputs, dict) and "x_hat" in outputs:
            n = self.num_images
            self._pair = (outputs["x"][:n].detach().float().cpu(), outputs["x_hat"][:n].detach().float().cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pair, self._pair = self._pair, None
        if trainer.sanity_checking:
            return
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank asks.
        out = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions" if self.save_png else None
        if pair is None or not trainer.is_global_zero:
            return
        import torchvision

        x, x_hat = pair
        grid = torchvision.utils.make_grid(torch.cat([x, x_hat]), nrow=x.shape[0], padding=2)
        grid = ((grid + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]
        step = trainer.global_step
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):  # TensorBoard
                logger.experiment.add_image("val/reconstructions", grid, step)
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image("val/reconstructions", [grid], step=step, caption=["inputs (top) | reconstructions"])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(grid, out / f"step_{step:07d}.png")
            torchvision.utils.save_image(grid, out / "latest.png")


# ------------------------------------------------------------------------------------------------
# Training throughput: images/s over all ranks, measured between consecutive batch ends (so data
# loading counts), logged as train/images_per_s; on CUDA also the peak GPU memory of this rank since the
# previous log, train/peak_memory_gib.


class Throughput(Callback):
    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            images = batch["image"].shape[0] * trainer.world_size
            pl_module.log("train/images_per_s", images / (now - self._last), on_step=True, rank_zero_only=True)
            if pl_module.device.type == "cuda" and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
                pl_module.log("train/peak_memory_gib", peak, on_step=True, rank_zero_only=True)
                torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._last = now


# ------------------------------------------------------------------------------------------------
# The run's place: a resumed run (`fit --ckpt_path`) logs into the folder of the run it continues, and its progress
# bar says where the run is in its whole budget, not only in the current epoch.


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the optimiser step and its total first among its items: `step=1312/2000`
    (without a max_steps, the step alone)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        total = trainer.max_steps
        step = f"{trainer.global_step}/{total}" if total is not None and total > 0 else str(trainer.global_step)
        return {"step": step, **super().get_metrics(trainer, pl_module)}


class RunLogFolder(Callback):
    """Writes into every checkpoint where the run logs (`checkpoint["log_folders"]`: per logger with a version
    folder, its class, root folder and version), so that `resume_log_folder` can send a resumed run there."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["log_folders"] = [
            {"logger": type(logger).__name__, "root_dir": os.path.abspath(logger.root_dir), "version": logger.version}
            for logger in trainer.loggers if _versioned(logger)
        ]


def _versioned(logger) -> bool:
    """A logger that writes into <root_dir>/version_N (TensorBoard, CSV)."""
    return hasattr(logger, "_version") and isinstance(getattr(logger, "root_dir", None), str)


def resume_log_folder(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """Before `fit` resumes from `ckpt_path` (a file, or "last": the file the trainer resumes from, found by
    checkpointing.last_checkpoint_in), give each logger the version that the checkpoint's run used, so that the run
    goes on in its own log folder (not a new version_N). Loggers whose root folder differs from the checkpoint's, and
    checkpoints that do not record it, are left alone."""
    if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return
    if ckpt_path == "last":
        from dcssdae.checkpointing import last_checkpoint_in

        ckpt_path = last_checkpoint_in(*(getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks))
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return
    try:  # the loader proper reports a bad file; here it only means: no folder to go on in
        records = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("log_folders") or []
    except Exception:  # noqa: BLE001
        return
    for logger in trainer.loggers:
        if not _versioned(logger) or not _default_version(logger):
            continue
        for record in records:
            if record.get("logger") == type(logger).__name__ and \
                    os.path.abspath(logger.root_dir) == record.get("root_dir"):
                logger._version = record["version"]


def _default_version(logger) -> bool:
    """Whether the logger's version is Lightning's default (the next free version_N, or on SLURM the job id), not
    one the user gave."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    version = logger._version
    return version is None or (SLURMEnvironment.job_id() is not None and str(version) == str(SLURMEnvironment.job_id()))
