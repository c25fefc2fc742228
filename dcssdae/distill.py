"""DistillSystem: one-step distillation of a trained DC-SSDAE decoder (SSDD, Vallaeys et al. 2025, Sec. 3.4).

The teacher is the frozen model of `init_from` (its EMA weights, normally phase 3's) sampling `teacher_steps`
steps from noise with the configured sampler (for EqM by default gd on the noise schedule: a sample of p(x | z),
not the blurry mean that one large step gives). The student starts as a copy of the teacher and learns to map the
same noise and the same latent z (posterior mean) to the teacher's result in a single decoder evaluation. Its
loss is the objective's own loss at the pure-noise level (EqM gamma = 0, FM t = 1) with the teacher's sample
standing in for the data, plus LPIPS between the two images:

    z = E(x);  x_teacher = sample_N(teacher, noise, z)                      # N evaluations, no gradient
    pred = pred(noise, student(noise, z));  x_student = to_x0(noise, pred)  # the one-step decoder
    loss = w_distill * |pred - target(x_teacher, noise)|^2 + w_lpips * LPIPS(x_student, x_teacher)
           + w_data * LPIPS(x_student, x)

(For EqM the first term is c(0)^2 * |x_student - x_teacher|^2, for FM exactly |x_student - x_teacher|^2.) The last
term (weight `loss_weights.data`, 0 = SSDD's loss) uses what an autoencoder's distillation has and a generator's does
not: the real image x is itself a draw of p(x | z), the one the latent came from, though not paired with the noise.
The teacher's sample gives the student a noise-paired target; x keeps it on the data where that sample drifts (the two
perceptual terms share one pass of the network over the student's image). The terms are logged as train/distill,
train/lpips (or train/stlpips) and train/data; their weights are `loss_weights.distill`, `.lpips` (or `.stlpips`)
and `.data`.
Only the student's decoder trains; the encoder is frozen and shared: student and teacher hold the same encoder
module (one copy in memory), and the EMA averages the student's decoder only. Validation decodes in one step.

The teacher must be the network the run reads it as: a teacher trained with another corruption (objective, decay,
lambda, parameterisation; e.g. one saved before the `parameterization` option, whose network outputs the field,
under a `denoiser` config) is refused when the run starts, not merely warned about.

Checkpoints hold the student (and its EMA), not the teacher: the teacher is `init_from`'s model, which a resume
(`--ckpt_path`) or `load_from_checkpoint` reads again from that file (so it must still be there). They record the
teacher's identity, `checkpoint["distill_teacher"]` = {"path", "global_step", "sha256"} (the step of the teacher's
checkpoint or export and a hash of its weights); a resume whose `init_from` holds other weights (phase 3's
`last.ckpt` rewritten since) is refused, naming both.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dcssdae.autoencoder import load_weights
from dcssdae.objectives import FlowMatching
from dcssdae.system import DCSSDAESystem


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))  # (a byte view: bf16 has no numpy dtype)
    return digest.hexdigest()


def checkpoint_step(path: str) -> int | None:
    """The global step a teacher file was written at: a `.ckpt`'s `global_step` (memory-mapped, tensors not read) or
    an export's recorded step; None when it does not say."""
    try:
        if Path(path).is_dir():
            return json.loads((Path(path) / "config.json").read_text()).get("export", {}).get("global_step")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001 (a file that load_weights read but this cannot: the step is only a label)
        return None


def teacher_identity(path: str, state: dict[str, torch.Tensor]) -> dict:
    """{"path", "global_step", "sha256"}: where the teacher came from and which weights it holds."""
    return {"path": str(path), "global_step": checkpoint_step(path), "sha256": weights_sha256(state)}


def describe_teacher(identity: dict) -> str:
    return f"{identity['path']} (step {identity['global_step']}, weights sha256 {identity['sha256'][:12]})"


class DistillSystem(DCSSDAESystem):
    """Student decoder trained to reproduce the teacher's N-step samples in one step."""

    def __init__(self, *args, teacher_steps: int = 8, val_steps: int | None = 1, **kwargs):
        """
        Args:
            teacher_steps: sampler steps of the teacher (the configured sampler's method and step size).
            val_steps: validation sampler steps of the student (1: the distilled one-step decoder).
        """
        super().__init__(*args, val_steps=val_steps, **kwargs)
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {teacher_steps}")
        if self.encoder_trains:
            raise ValueError("distillation trains the decoder only: set trainable to decoder patterns, e.g. "
                             "['decoder.*']")
        if self.loss_weights.data > 0 and self.lpips is None:
            raise ValueError(f"loss_weights.data is a perceptual distance to the real image: it needs the perceptual "
                             f"network, so set loss_weights.{self.hparams.lpips_variant} > 0 as well")
        self.teacher_steps = teacher_steps
        # The teacher: a copy of the student's decoder (its weights: setup() or the checkpoint) around the very same
        # frozen encoder module (one copy in memory; its entries appear under both prefixes in the module's state).
        shared = {id(self.ae.encoder): self.ae.encoder}
        self.teacher = copy.deepcopy(self.ae, memo=shared).requires_grad_(False).eval()
        self.teacher_identity: dict | None = None  # see the module docstring
        # The student is a one-step decoder: its own sampler (kept in its checkpoints and exports) is the single step;
        # the teacher keeps the configured multi-step sampler.
        self.ae.sampler = self.ae.one_step_sampler()
        if any(n != 1 for n in self.val_extra_steps):
            raise ValueError(f"the student decodes in one step: val_extra_steps may hold only 1, got "
                             f"{self.val_extra_steps}")

    def setup(self, stage: str) -> None:
        new_run = stage == "fit" and self.trainer.ckpt_path is None  # (a resumed run: see on_load_checkpoint)
        if new_run and not self.init_from:
            raise ValueError("distillation needs a teacher: set model.init_from to the phase-3 checkpoint")
        super().setup(stage)  # loads init_from into the student (its corruption checked strictly: see below)
        if new_run:
            self.teacher.load_state_dict(self.ae.state_dict())
            self.teacher_identity = teacher_identity(self.init_from, self.teacher.state_dict())

    def check_corruption(self, saved: dict | None, path: str, strict: bool = True) -> None:
        """Always strict: a teacher (init_from) or a checkpoint of another corruption is refused."""
        super().check_corruption(saved, path, strict=True)

    # The frozen teacher is init_from's model: not written into checkpoints, read again from init_from on load.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not k.startswith("teacher.")}
        if self.teacher_identity is not None:
            checkpoint["distill_teacher"] = dict(self.teacher_identity)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if any(k.startswith("teacher.") for k in checkpoint.get("state_dict", {})):
            return  # an older checkpoint that carries its teacher
        if not self.init_from:
            raise ValueError("this distillation checkpoint does not hold its teacher: set model.init_from to the "
                             "teacher's checkpoint (the phase-3 run it was distilled from)")
        config, teacher = load_weights(self.init_from)
        self.check_corruption(config.get("corruption"), self.init_from)
        own = self.teacher.state_dict()
        self.verify_teacher(checkpoint.get("distill_teacher"),
                            teacher_identity(self.init_from, {k: v for k, v in teacher.items() if k in own}))
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                state = checkpoint[key]
                # the teacher's decoder from init_from; its encoder is the student's (one shared module)
                encoder = {f"teacher.{k[len('ae.'):]}": v for k, v in state.items() if k.startswith("ae.encoder.")}
                state.update({f"teacher.{k}": v for k, v in teacher.items() if not k.startswith("encoder.")})
                state.update(encoder)

    def verify_teacher(self, saved: dict | None, loaded: dict) -> None:
        """Refuse a teacher whose weights are not the ones the run was distilled from (resuming fit); remember it."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if saved is None:
            if fitting:
                rank_zero_warn(f"this distillation checkpoint predates teacher identities: its teacher cannot be "
                               f"checked; distilling on from {describe_teacher(loaded)}")
        elif saved["sha256"] != loaded["sha256"] and fitting:
            raise ValueError(f"model.init_from {describe_teacher(loaded)} is not the teacher this run was distilled "
                             f"from: {describe_teacher(saved)}. Point init_from at that teacher, or start a new "
                             f"distillation (without --ckpt_path) from this one")
        self.teacher_identity = saved if saved is not None and saved["sha256"] == loaded["sha256"] else loaded

    def train(self, mode: bool = True) -> DistillSystem:
        super().train(mode)
        self.teacher.eval()  # the teacher always samples in inference mode
        return self

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        with torch.no_grad():
            z = self.teacher.encoder(x).mode()                              # same z for teacher and student
            noise = torch.randn_like(x)                                     # same noise for both
            x_teacher, _ = self.teacher.sample(noise, z, self.teacher.sampler_settings(steps=self.teacher_steps))
        level = torch.full((x.shape[0],), 1.0 if isinstance(self.corruption, FlowMatching) else 0.0,
                           device=x.device)                                 # pure noise: FM t = 1, EqM gamma = 0
        out = self.ae.decoder(noise, z, self.corruption.decoder_time(level))    # one student evaluation
        pred = self.corruption.pred(noise, out)                             # field / velocity
        x_student = self.corruption.to_x0(noise, pred, level)
        target = self.corruption.target(x_teacher, noise, level)            # the teacher's sample as the data
        terms = {}
        if self.loss_weights.distill > 0:
            terms["distill"] = self.corruption.loss(pred, target).mean()    # the objective's loss at level 0/1
        if self.lpips is not None:                                          # one pass over the student's image
            targets = (x_teacher, x) if self.loss_weights.data > 0 else (x_teacher,)  # x: a draw of p(x | z)
            to_teacher, *to_x = self.lpips.distances(x_student, *targets)
            terms[self.lpips.name] = to_teacher.mean()
            if to_x:
                terms["data"] = to_x[0].mean()
        return self.log_loss(terms)
