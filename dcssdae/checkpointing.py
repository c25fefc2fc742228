"""Checkpoints that survive clusters: atomic writes, safe loading, a save on pre-emption, exact resume.

Read top to bottom: what a checkpoint may hold (finite tensors, nothing but weights when loaded), writing one
atomically, the `AtomicCheckpointIO` plugin Lightning writes and reads through, the `PreemptionCheckpoint`
callback (SIGTERM / first Ctrl+C -> finish the step, write `last.ckpt`, exit) and the `StepSeed` callback that
makes the noise of every training batch a function of (seed, rank, epoch, batch index), so that a resumed run
draws exactly the noise an uninterrupted run would have drawn.

What Lightning 2.6 already does, and is kept:
  * SIGTERM: `trainer.received_sigterm` is set; the training loop finishes the current batch and raises
    `SIGTERMException` (a `SystemExit`), which reaches every callback's `on_exception`. Lightning itself saves
    nothing there; `PreemptionCheckpoint` does.
  * SLURM (`SLURMEnvironment(auto_requeue=True)`, detected by default under `srun`/`sbatch`): on the requeue
    signal (SIGUSR1, ask for it with `#SBATCH --signal=USR1@120`) Lightning writes `hpc_ckpt_N.ckpt` in
    `default_root_dir` and runs `scontrol requeue`; that write goes through this module's `AtomicCheckpointIO`.
What it does not do: Lightning's own atomic save builds the file in the system temp dir and then moves it,
which is a copy, not a rename, when that dir is on another file system, so a kill during the copy leaves a
truncated file under the final name. `AtomicCheckpointIO` writes beside the target, fsyncs and renames: a run
SIGKILLed while it writes `last.ckpt` leaves the previous one whole and resumes from it
(tests/test_checkpointing.py).

Resuming and extending (`dcssdae fit --ckpt_path last`, with the same or a larger `--trainer.max_steps`): weights,
EMA, optimiser moments, data position and per-batch noise continue exactly. The learning-rate schedule keeps its
horizon in the checkpoint (dcssdae.lr_schedule): with the same max_steps it continues exactly; a constant schedule
(after its warm-up) is the same whatever the horizon, so an extended run equals a longer uninterrupted one; a cosine
schedule is re-planned at the resume step, the rest of the cosine stretched from the learning rate reached to 0 at
the new horizon (no re-warm-up, no jump), which is not the schedule a run started with the longer horizon would
have had. A cosine that already reached 0 is not extended (refused: start a new phase with --model.init_from).
Settings given with --ckpt_path (lr, weight decay, betas, ...) replace the checkpoint's; see dcssdae.cli.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from dcssdae.atomic_files import atomic_file

log = logging.getLogger(__name__)


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint about to be written holds NaN or Inf values; it is not written."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read: missing, truncated, corrupt, or holding more than weights."""


# ------------------------------------------------------------------------------------------------
# What a checkpoint may hold: finite weights, EMA and optimiser moments. (Other entries may hold Inf on
# purpose, e.g. ModelCheckpoint's best score before any; they are not checked.)

CHECKED_ENTRIES = ("state_dict", "current_model_state", "optimizer_states")


def _tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in nested dicts / lists / tuples, with a "/"-joined path as its name."""
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)] if tree.is_floating_point() or tree.is_complex() else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [named for key, value in items for named in _tensors(value, f"{prefix}/{key}" if prefix else str(key))]


def nonfinite_tensors(tree: Any) -> list[str]:
    """Names (paths in `tree`) of the floating tensors that hold a NaN or an Inf; one device sync per device."""
    named = _tensors(tree)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([named[i][1].isfinite().all() for i in indices]).cpu()
        bad += [named[i][0] for i, ok in zip(indices, finite.tolist()) if not ok]
    return sorted(bad)


def check_finite(checkpoint: dict, path: str | os.PathLike) -> None:
    """Raise `NonFiniteCheckpointError` naming the weights / optimiser tensors of `checkpoint` that are not finite."""
    bad = nonfinite_tensors({k: v for k, v in checkpoint.items() if k in CHECKED_ENTRIES})
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
        raise NonFiniteCheckpointError(
            f"refusing to write checkpoint {path}: {len(bad)} tensor(s) hold NaN or Inf ({shown}); "
            "the previous checkpoint there (if any) is kept"
        )


# ------------------------------------------------------------------------------------------------
# Writing a checkpoint atomically (`dcssdae.atomic_files.atomic_file`: temp file beside the target, fsync, rename over the
# target, fsync the folder): a reader sees the old file or the new one, never a partial one, even after a kill -9.


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` so that `path` always holds either its previous content or all of `obj`."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def _local_path(path: str | os.PathLike) -> Path | None:
    """`path` as a local Path, or None for a remote fsspec URL (s3://, gs://, ...)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return None if "://" in text else Path(text)


# ------------------------------------------------------------------------------------------------
# Safe loading: torch.load(weights_only=True), with errors that name the file and the problem.


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """Read a `.ckpt` / `.pt` file with `torch.load(weights_only=True)` (no arbitrary unpickling).

    Raises `CheckpointLoadError` (not a deep torch traceback) for a missing, truncated or corrupt file, and for a
    file holding Python objects other than tensors and plain containers.
    """
    local = _local_path(path)
    if local is not None and not local.is_file():
        raise CheckpointLoadError(f"checkpoint {path} does not exist")
    try:
        if local is not None:
            return torch.load(local, map_location=map_location, weights_only=weights_only)
        from lightning.fabric.utilities.cloud_io import _load

        return _load(os.fspath(path), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(e))
        reason = reason.group(1).strip() if reason else str(e).strip().splitlines()[0]
        if "Unsupported global" not in reason:  # not a pickle at all: junk bytes
            raise CheckpointLoadError(f"checkpoint {path} cannot be read (not a torch checkpoint?): {reason}") from None
        raise CheckpointLoadError(
            f"checkpoint {path} holds Python objects other than weights; refusing to unpickle them "
            f"(torch.load weights_only=True: {reason}). Load files you trust only with weights_only=False."
        ) from None
    except Exception as e:  # noqa: BLE001 (a damaged zip or pickle fails in many ways: RuntimeError, struct.error...)
        raise CheckpointLoadError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------
# The Lightning plugin: every checkpoint Lightning writes (ModelCheckpoint, SLURM hpc_ckpt, pre-emption,
# trainer.save_checkpoint) is checked for NaN/Inf and written atomically; every resume loads weights only.


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic local writes, a finite-values check and weights-only loading.

    Remote paths (s3://, gs://, ...) are written by Lightning's own fsspec transaction (an object store
    replaces an object in one piece, so it is atomic there too).
    """

    def __init__(self, check_finite: bool = True) -> None:
        """
        Args:
            check_finite: refuse to write a checkpoint holding NaN/Inf (weights, EMA or optimiser moments).
        """
        super().__init__()
        self.check_finite = check_finite

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if self.check_finite:
            check_finite(checkpoint, path)
        local = _local_path(path)
        if local is None:
            log.info("%s is remote: written through Lightning's fsspec transaction", path)
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, local)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None):
        """`torch.load(weights_only=True)` unless the caller asks for False (then it is their trusted file)."""
        return load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


def last_checkpoint_in(*folders: str | os.PathLike | None) -> str | None:
    """The file `--ckpt_path last` resumes from, as Lightning picks it among the checkpoint folders (one per
    ModelCheckpoint): the newest, by modification time, `.ckpt` whose name starts with "last" (last.ckpt,
    last-N.ckpt, last-vN.ckpt: Lightning's pattern matches every such name). None when there is none; remote folders
    are not looked in."""
    found = [p for folder in folders if folder and "://" not in str(folder) and Path(folder).is_dir()
             for p in Path(folder).iterdir() if p.suffix == ".ckpt" and p.stem.startswith("last")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> pl.Trainer:
    """Make `trainer` write and read checkpoints with `AtomicCheckpointIO`, unless it was given another
    CheckpointIO plugin (async, sharded, ...), which is kept."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.callbacks:
        if isinstance(callback, RunCheckpoint):
            callback.use_root_dir(trainer)
    return trainer


# ------------------------------------------------------------------------------------------------
# The run's checkpoint: <default_root_dir>/checkpoints/last.ckpt, written when the run ends as a pre-emption
# would write it (so that extending a finished run with --ckpt_path continues from it; for the learning-rate
# schedule, see the module docstring), and at every validation /
# epoch end (so that a crash does not lose the run) even with save_top_k 0 and no every_n_train_steps.


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with three changes:

    * `dirpath` None means `<trainer.default_root_dir>/checkpoints` (not the logger's version folder): two runs with
      other root folders never share a file, and a phase finds the previous one at `runs/<phase>/checkpoints`.
    * With `save_last`, `last.ckpt` is written after the run's final optimiser step, from `on_train_batch_end`
      (max_steps, max_epochs, max_time or a stop request reached): the loop position is then that of a mid-epoch
      checkpoint and the module holds the live weights. (Lightning writes it in `on_train_end`, after the epoch has
      been marked complete and after the EMA callback copied the averaged weights into the module: a resume from
      that file starts a new epoch from the EMA weights.)
    * With `save_last`, `last.ckpt` is also rewritten at every validation end and training epoch end of `fit`.
    """

    def use_root_dir(self, trainer: pl.Trainer) -> None:
        """dirpath None -> <default_root_dir>/checkpoints. Called when the trainer is built (`--ckpt_path last` is
        looked up in dirpath before any setup hook) and again at setup."""
        if self.dirpath is None:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
            self.dirpath = os.path.realpath(folder) if _local_path(folder) is not None else folder

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.use_root_dir(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # the run says where it writes (trainer.log_dir is a collective under DDP: every rank)
            log_dir = trainer.log_dir
            rank_zero_info(f"checkpoints: {self.dirpath}" + (" (last.ckpt)" if self.save_last else "")
                           + f"; logs, config.yaml and reconstructions: {log_dir}")

    @staticmethod
    def run_ends_after_this_batch(trainer: pl.Trainer) -> bool:
        """Whether the training batch just finished is the run's last one (checked in `on_train_batch_end`)."""
        loop = trainer.fit_loop
        if trainer.should_stop:  # max_time, early stopping, a callback's request
            return trainer.global_step >= loop.min_steps if loop.min_steps else True
        if loop.max_steps != -1 and trainer.global_step >= loop.max_steps:
            return True
        last_epoch = loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= loop.max_epochs
        return last_epoch and loop.epoch_loop.batch_progress.is_last_batch

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.run_ends_after_this_batch(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_now(trainer)  # only if no step end saved it (e.g. an epoch without batches)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        close_finished_epoch(checkpoint, trainer.num_training_batches)


def close_finished_epoch(checkpoint: dict, batches_per_epoch: float) -> None:
    """Record an epoch whose batches have all been trained on as complete in the checkpoint's loop state.

    A checkpoint written after an epoch's last batch (at its batch end, validation or a pre-emption) but before
    Lightning marked the epoch complete is resumed by Lightning 2.6 into an extra, empty epoch: the run then
    continues in epoch e + 2, with the data and the per-batch seeds of that epoch instead of e + 1's. Written as
    "epoch e done, e + 1 not started", it resumes at batch 0 of epoch e + 1, as the uninterrupted run went on.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops or "epoch_loop.batch_progress" not in loops or batches_per_epoch == float("inf"):
        return
    batch, epoch = loops["epoch_loop.batch_progress"], loops["epoch_progress"]
    if batch["current"]["processed"] < batches_per_epoch or epoch["current"]["processed"] == epoch["current"]["ready"]:
        return  # mid-epoch, or the epoch is already recorded as processed (Lightning resumes that one itself)
    for progress in (epoch["total"], epoch["current"]):  # epoch e: ready, started, processed, completed
        progress.update(processed=progress["started"], completed=progress["started"])
    batch["total"]["completed"] = batch["total"]["processed"]
    batch["current"] = {key: 0 for key in batch["current"]}
    batch["is_last_batch"] = False


# ------------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM (and a first Ctrl+C, turned into the same graceful stop) -> finish the current step,
# write <checkpoint dir>/last.ckpt, exit. `dcssdae fit --ckpt_path last` then resumes from it.


preempted_checkpoint: str | None = None  # set once a pre-emption checkpoint was written (read by dcssdae.cli.main)


class PreemptionCheckpoint(Callback):
    """Write a checkpoint when the run is stopped by SIGTERM or a first Ctrl+C (SIGINT), then exit.

    Lightning turns SIGTERM into "finish this batch, then raise `SIGTERMException`"; this callback turns the first
    SIGINT into the same, and on that exception saves `<dir>/<filename>.ckpt`, where <dir> is the ModelCheckpoint's
    folder (so `--ckpt_path last` finds it) or `<default_root_dir>/checkpoints`. A second Ctrl+C stops at once,
    without a checkpoint (the weights may be mid-update). Other exceptions save nothing: the state may be torn.
    """

    def __init__(self, filename: str = "last", handle_sigint: bool = True) -> None:
        """
        Args:
            filename: checkpoint name, without ".ckpt" ("last": found by `--ckpt_path last`).
            handle_sigint: treat the first Ctrl+C like SIGTERM (save, then exit) instead of stopping at once.
        """
        if not filename or "/" in filename:
            raise ValueError(f"filename must be a plain file name without extension, got {filename!r}")
        self.filename, self.handle_sigint = filename, handle_sigint
        self.saved_path: str | None = None
        self._trainer: pl.Trainer | None = None
        self._previous_sigint: Any = None
        self._interrupts = 0

    def ckpt_path(self, trainer: pl.Trainer) -> str:
        folders = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        folder = folders[0] if folders else os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, self.filename + ".ckpt")

    # -- SIGINT -> graceful stop -----------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own handlers (which it restores at teardown).
        self._trainer, self._interrupts = trainer, 0
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    # -- SIGTERM to the whole process group ------------------------------------------------------
    # `timeout`, container runtimes and schedulers signal every process of the job: the data-loader workers die at
    # once, and torch's SIGCHLD handler then raises "DataLoader worker ... killed by signal" in the main process,
    # wherever it is. Once a stop was requested that error is expected: the main process ignores it, finishes the
    # step and saves (a worker death without a stop request is still an error). If the main process was waiting for
    # a batch, the loader raises instead; on_exception saves then too (the step before it was complete).

    @staticmethod
    def _stop_requested(trainer: pl.Trainer | None) -> bool:
        return trainer is not None and bool(getattr(trainer, "received_sigterm", False))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # torch installs its SIGCHLD handler when the first multi-worker loader starts: wrap it once it is there.
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
            return
        current = signal.getsignal(signal.SIGCHLD)
        if callable(current) and not getattr(current, "_dcssdae_tolerant", False):
            signal.signal(signal.SIGCHLD, self._tolerant_sigchld(current))

    def _tolerant_sigchld(self, previous):
        def handler(signum, frame):
            try:
                previous(signum, frame)
            except RuntimeError:
                if not self._stop_requested(self._trainer):
                    raise

        handler._dcssdae_tolerant = True
        return handler

    @staticmethod
    def _worker_died(exception: BaseException) -> bool:
        return isinstance(exception, RuntimeError) and "DataLoader worker" in str(exception)

    def _on_sigint(self, signum, frame) -> None:
        self._interrupts += 1
        if self._interrupts > 1 or self._trainer is None:
            raise KeyboardInterrupt
        rank_zero_warn("Interrupted: finishing the current step and saving a checkpoint (Ctrl+C again: stop now, "
                       "no checkpoint)")
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "received_sigterm"):
            connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
        else:
            signal.raise_signal(signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint, self._trainer = None, None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    # -- the save --------------------------------------------------------------------------------

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        stopped = isinstance(exception, SIGTERMException) or (self._stop_requested(trainer)
                                                              and self._worker_died(exception))
        if not stopped or trainer.state.fn != "fit":
            return
        path = self.ckpt_path(trainer)
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except NonFiniteCheckpointError as e:
            log.error("pre-emption checkpoint not written: %s", e)
            return
        self.saved_path = path
        global preempted_checkpoint
        preempted_checkpoint = path
        rank_zero_info(f"Pre-empted at step {trainer.global_step} (epoch {trainer.current_epoch}): checkpoint "
                       f"written to {path}; resume with `dcssdae fit ... --ckpt_path {path}` (or `--ckpt_path last`)")


# ------------------------------------------------------------------------------------------------
# Exact resume of the random draws: the global RNGs are reseeded before every training batch from
# (seed, rank, epoch, batch index), so step k draws the same noise (posterior sample, levels, noise,
# dropout) whether the run reached it directly or was stopped and resumed. The seed is stored in the
# checkpoint. Data order is restored by the data module (see ImageNetDataModule.state_dict).


def step_seed(seed: int, rank: int, epoch: int, batch_idx: int) -> int:
    """A 63-bit seed for one training batch, independent for every (seed, rank, epoch, batch_idx)."""
    state = np.random.SeedSequence([seed, rank, epoch, batch_idx]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


class StepSeed(Callback):
    """Reseed Python's, NumPy's and torch's (CPU and CUDA) global RNGs before every training batch."""

    def __init__(self, seed: int | None = None) -> None:
        """
        Args:
            seed: base seed; None = the run's `seed_everything` value (PL_GLOBAL_SEED), else 0. A resumed run
                uses the seed stored in its checkpoint.
        """
        self.seed = seed

    @property
    def state_key(self) -> str:
        return "StepSeed"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed = step_seed(self.seed or 0, trainer.global_rank, trainer.current_epoch, batch_idx)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # CPU and every CUDA device

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
