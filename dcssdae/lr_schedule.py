"""The AdamW learning-rate schedule: linear warm-up, then constant or half a cosine down to 0 at the horizon
(trainer.max_steps); and what a resume does with it.

    factor(k) = (k + 1) / warmup                                  k < warmup (k = optimiser steps taken)
              = 1                                                 constant
              = (1 + cos(pi * phase(k))) / 2                      cosine
    phase(k)  = phase_0 + (1 - phase_0) * (k - k_0) / (horizon - k_0)   (capped at 1)

A new run has k_0 = warmup, phase_0 = 0, horizon = trainer.max_steps: the plain half cosine. The schedule keeps
(warmup, kind, horizon, k_0, phase_0) in the checkpoint (`lr_schedulers[0]["lr_lambdas"][0]`, as LambdaLR saves a
callable object's attributes), so a resume with the same trainer.max_steps continues exactly.

Extension (a resume with another `--trainer.max_steps`, or from a checkpoint of another kind or without the stored
horizon): the run goes on from the factor f it had reached at the resume step k, with no re-warm-up and no jump.
Under cosine the rest of the curve is stretched (or squeezed) to end at the new horizon: k_0 = k, phase_0 =
arccos(2 f - 1) / pi, so the factor is f at k and falls as a half cosine's tail to 0 at the new horizon. A resume
inside the warm-up keeps the warm-up and starts the cosine after it, with the new horizon. A cosine run that already
reached 0 cannot be extended (it would train at learning rate 0): that is refused, with the way out (a new phase
with --model.init_from). The learning rate itself is this run's `lr` (given with --ckpt_path it replaces the
checkpoint's; left out, it is the checkpoint's): lr * factor.
"""

from __future__ import annotations

import math

import torch


class WarmupSchedule:
    """The learning-rate factor of step k (see the module docstring); a callable object whose attributes LambdaLR
    saves in the checkpoint."""

    def __init__(self, warmup: int, kind: str, horizon: int):
        """
        Args:
            warmup: linear warm-up steps (at least 1).
            kind: "constant" or "cosine".
            horizon: the step at which the cosine reaches 0 (trainer.max_steps).
        """
        if kind not in ("constant", "cosine"):
            raise ValueError(f"unknown lr schedule {kind!r}; known: constant, cosine")
        self.warmup, self.kind, self.horizon = max(1, int(warmup)), kind, int(horizon)
        self.start, self.start_phase = self.warmup, 0.0  # where the current cosine segment starts

    def phase(self, step: int) -> float:
        span = max(1, self.horizon - self.start)
        return min(1.0, self.start_phase + (1 - self.start_phase) * max(0, step - self.start) / span)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * self.phase(step)))

    def continue_from(self, step: int, factor: float) -> None:
        """Re-plan the cosine from `step`, where the factor was `factor`, to 0 at `self.horizon` (an extension)."""
        if step < self.warmup or self.kind == "constant":
            self.start, self.start_phase = self.warmup, 0.0
            return
        if factor <= 0.0 and step < self.horizon:
            raise ValueError(f"lr_schedule 'cosine' reached learning rate 0 at step {step}: extending it to "
                             f"trainer.max_steps {self.horizon} would train at learning rate 0; start a new phase from "
                             "this checkpoint instead (--model.init_from CKPT without --ckpt_path: a new warm-up and "
                             "cosine)")
        self.start, self.start_phase = step, math.acos(min(1.0, max(-1.0, 2 * factor - 1))) / math.pi


class LRSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR with a `WarmupSchedule` whose loading applies this run's lr, warm-up, kind and horizon, continuing
    from where the checkpoint's schedule stood (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, kind: str, horizon: int):
        super().__init__(optimizer, WarmupSchedule(warmup, kind, horizon))

    @property
    def schedule(self) -> WarmupSchedule:
        return self.lr_lambdas[0]

    def load_state_dict(self, state_dict: dict) -> None:
        ours, base_lrs = dict(vars(self.schedule)), list(self.base_lrs)
        plan = {k: ours[k] for k in ("warmup", "kind", "horizon")}
        saved = (state_dict.get("lr_lambdas") or [None])[0]
        saved_base = list(state_dict.get("base_lrs") or base_lrs)
        super().load_state_dict(state_dict)  # the saved schedule, base lrs and step
        step = self.last_epoch
        if saved is not None:
            factor = self.schedule(step)  # where the saved schedule stands
            unchanged = all(saved.get(k) == v for k, v in plan.items())
        else:  # saved before the schedule kept its state: read it off the last learning rate
            factor = state_dict.get("_last_lr", saved_base)[0] / saved_base[0]
            unchanged = abs(factor - WarmupSchedule(**plan)(step)) < 1e-9
        vars(self.schedule).update(ours)  # this run's warm-up, kind and horizon
        if saved is not None and unchanged:
            self.schedule.start, self.schedule.start_phase = saved["start"], saved["start_phase"]
        elif not unchanged:
            self.schedule.continue_from(step, factor)
        self.base_lrs = base_lrs  # this run's lr
        self._last_lr = [base * self.schedule(step) for base in base_lrs]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, self._last_lr):
            group["lr"], group["initial_lr"] = lr, base
