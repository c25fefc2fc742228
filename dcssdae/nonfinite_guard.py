"""Non-finite guard: a step whose loss or gradients hold NaN/Inf is skipped, counted, and, after too many in
a row, stops the run with a message that names the loss term(s) and the step.

Interface with the LightningModule: during `training_step` the module sets `self.last_terms`, the dict of the
named (unweighted) loss terms of the step, e.g. {"eqm": ..., "lpips": ..., "repa": ..., "kl": ...}
(`DCSSDAESystem.log_loss` does). Without it the guard still checks the gradients and reports "loss".

Skipping: the gradients are set to None before `optimizer.step()`, so AdamW (and every torch optimiser) leaves
each parameter, its moments and its step count untouched; the LR scheduler still advances by one step, and
schedule-free optimisers still advance their iterate counter. Under fp16 mixed precision the GradScaler
already skips steps with Inf/NaN gradients (and lowers its scale; that is routine, not counted here); only a
non-finite loss is counted there. Under DDP the decision is taken over all ranks (any rank -> all skip).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def _nonfinite_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: value} of the terms that are not finite (one device sync)."""
    if not terms:
        return {}
    names = list(terms)
    device = next((v.device for v in terms.values() if isinstance(v, torch.Tensor)), None)
    values = torch.stack([torch.as_tensor(terms[n], device=device).detach().float().sum() for n in names]).cpu()
    return {n: float(v) for n, v in zip(names, values.tolist()) if not math.isfinite(v)}


def _nonfinite_grads(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an Inf (max-abs norm: no overflow; one sync)."""
    if not named:
        return []
    norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named], ord=math.inf)]).cpu()
    return [name for (name, _), ok in zip(named, torch.isfinite(norms).tolist()) if not ok]


class NonFiniteGuard(Callback):
    """Skip optimiser steps with a non-finite loss or gradient; stop after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int = 20, check_gradients: bool = True) -> None:
        """
        Args:
            max_consecutive: stop the run (NonFiniteLossError) after this many skipped steps in a row; 0 = never.
            check_gradients: also skip steps whose loss is finite but whose gradients are not.
        """
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive, self.check_gradients = max_consecutive, check_gradients
        self.skipped = 0  # skipped steps over the whole run (restored on resume)
        self.consecutive = 0  # skipped steps in a row, up to the last one

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        terms = getattr(pl_module, "last_terms", None) or {}
        bad_terms = _nonfinite_terms(terms)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad_grads: list[str] = []
        if self.check_gradients and scaler is None:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            named = [(names.get(id(p), "?"), p.grad) for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            bad_grads = _nonfinite_grads(named)
        bad = trainer.strategy.reduce_boolean_decision(bool(bad_terms or bad_grads), all=False)
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if scaler is None:  # the GradScaler skips by itself (and needs the gradients to do so)
            optimizer.zero_grad(set_to_none=True)
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        what = self._describe(bad_terms, bad_grads, terms)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"training stopped at {where}: {self.consecutive} steps in a row had {what}; "
                f"{self.skipped} steps skipped in all. The weights were not updated by those steps, so the last "
                "checkpoint is usable: lower the learning rate, check the data, or raise "
                "NonFiniteGuard.max_consecutive."
            )
        log.warning("%s: skipped the optimiser step: %s (%d in a row, %d in all)", where, what, self.consecutive,
                    self.skipped)

    @staticmethod
    def _describe(bad_terms: dict[str, float], bad_grads: list[str], terms: dict) -> str:
        parts = []
        if bad_terms:
            parts.append("non-finite loss term(s) " + ", ".join(f"{n}={v}" for n, v in bad_terms.items()))
        elif not terms:
            parts.append("a non-finite loss (no per-term values: the module sets no `last_terms`)")
        if bad_grads:
            shown = ", ".join(bad_grads[:5]) + (", ..." if len(bad_grads) > 5 else "")
            parts.append(f"non-finite gradients in {len(bad_grads)} parameter(s) ({shown})")
        if not parts:
            parts.append("a non-finite loss or gradient on another rank")
        return " and ".join(parts)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])
