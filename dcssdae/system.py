"""DCSSDAESystem: the LightningModule that trains a DCSSDAE (every phase of the recipe; distillation subclasses it).

One training step is the data flow of the DC-SSDAE write-up (Sec. 3.2):

    x --encoder--> q(z|x) --sample--> z ----------------------------.
    noise, level ~ corruption --> x_t = corrupt(x, noise, level) --decoder(x_t, z, t?)--> out
    pred = corruption.pred(x_t, out) (field / velocity) --> x0_hat = to_x0(x_t, pred, level)
    loss = w_eqm * MSE(pred, target) + w_lpips * LPIPS(x0_hat, x) + w_repa * REPA(tokens, x) + w_kl * KL(q(z|x))
    (terms are logged by name: eqm or fm, lpips or stlpips, repa, kl; see dcssdae.losses.LossWeights)

Phases differ only in configuration (see configs/phase*.yaml): which parameters train (`trainable`, fnmatch
patterns over the autoencoder's parameter names), `init_from` (weights of the previous phase), image size and
loss weights. `init_from` loads weights only (a new phase); `dcssdae fit --ckpt_path` resumes the full state.
Validation decodes with the configured sampler from noise drawn per image from (val_seed, the image's key): the same
images every time, on any number of processes. It reports `ReconstructionMetrics` (means with bootstrap intervals,
KID, rFID on large sets) for the model, other step counts and the bicubic baseline; the EMA callback swaps in the
averaged weights for it. `dcssdae test` does the same on the data module's test images and writes
`test_metrics.json`; `dcssdae predict` reconstructs the validation images and writes `input | reconstruction` PNGs
(`ReconstructionWriter`, below).

Noise: every training batch draws its noise (posterior sample, levels, corruption noise) from the global RNGs, which
`dcssdae.checkpointing.StepSeed` (on in the CLI) reseeds before each batch from (seed, rank, epoch, batch index): every
DDP rank draws its own noise, and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dcssdae.atomic_files import write_json
from dcssdae.autoencoder import (
    DCSSDAE,
    build_corruption,
    corruption_config,
    load_weights,
    network_corruption_config,
)
from dcssdae.baselines import baseline
from dcssdae.losses import LossWeights, LPIPSLoss, REPALoss, kl_loss, lowpass_loss
from dcssdae.lr_schedule import LRSchedule
from dcssdae.metrics import (
    ReconstructionMetrics,
    format_table,
    image_keys,
    keyed_noise,
    psnr_uint8,
    quantize_uint8,
)
from dcssdae.objectives import EquilibriumMatching, FlowMatching

# Which weights `load_from_checkpoint` puts in the module: "ema" (the checkpoint's state_dict) or "live"
# (current_model_state); read by on_load_checkpoint, None outside load_from_checkpoint.
_LOAD_WEIGHTS: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcssdae_load_weights", default=None)

# Parameters that get no weight decay: biases, norm gains, embeddings and position tables (any tensor with < 2
# dims, plus these names), as in nanoGPT / timm.
NO_DECAY_NAMES = ("embed", "rel_bias", "pos_")


def _grow_output_rows(state: dict, own: dict, path: str) -> dict:
    """`state` with the decoder's output layer widened to this network's: where this decoder has more output
    channels than the file's (EqM `gated` initialised from a `denoiser`: one more, the gate), the file's rows are
    copied and the others keep their initialisation (zero: a gate that starts nearly closed)."""
    for key in ("decoder.out_conv.weight", "decoder.out_conv.bias"):
        theirs, mine = state.get(key), own.get(key)
        if theirs is None or mine is None or theirs.shape[1:] != mine.shape[1:] or len(theirs) >= len(mine):
            continue
        grown = mine.clone()
        grown[: len(theirs)] = theirs
        state = {**state, key: grown}
        rank_zero_info(f"init_from {path}: {key} has {len(mine)} output channels here, {len(theirs)} in the file; "
                       f"the others keep their initialisation")
    return state


def corruption_difference(saved: dict, theirs: dict, ours: dict) -> str:
    """What differs between two network corruption configs, e.g. "parameterization: 'field' there, 'denoiser'
    here", saying when the file predates the `parameterization` option (its network outputs the field)."""
    if theirs["class_path"] != ours["class_path"]:
        return f"{theirs['class_path'].rpartition('.')[2]} there, {ours['class_path'].rpartition('.')[2]} here"
    a, b = theirs["init_args"], ours["init_args"]
    parts = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    legacy = isinstance(saved, dict) and "parameterization" not in (saved.get("init_args") or {})
    if legacy and a.get("parameterization") == "field":
        parts.append("it was saved before the `parameterization` option, so its network outputs the field itself")
    return "; ".join(parts)


class DCSSDAESystem(pl.LightningModule):
    """Trains a DC-SSDAE autoencoder (encoder + diffusion decoder) with EqM/FM + LPIPS + REPA + KL."""

    def __init__(
        self,
        encoder: str = "dc-ae-f32c32-in-1.0",
        decoder: str = "S",
        corruption: EquilibriumMatching | FlowMatching | None = None,
        encoder_overrides: dict[str, Any] | None = None,
        decoder_overrides: dict[str, Any] | None = None,
        encoder_pretrained: str | None = None,
        sampler: dict[str, Any] | None = None,
        sample_posterior: bool = True,
        loss_weights: LossWeights | None = None,
        lpips_variant: Literal["lpips", "stlpips"] = "lpips",
        lpips_net: Literal["vgg", "alex"] = "vgg",
        repa_encoder: str = "vit_base_patch14_dinov2",
        repa_block: int = 4,
        repa_pretrained: bool = True,
        trainable: list[str] | None = None,
        init_from: str | None = None,
        optimizer: Literal["adamw", "radam_schedulefree"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        val_steps: int | None = None,
        val_extra_steps: list[int] | None = None,
        val_rfid: bool = True,
        val_kid: bool | None = None,
        val_lpips: str | list[str] | None = "lpips",
        val_baseline: Literal["bicubic"] | None = "bicubic",
        val_seed: int = 0,
        predict_dir: str | None = "reconstructions",
    ):
        """
        Args:
            encoder: encoder preset (dcssdae.encoders.ENCODERS), e.g. "dc-ae-f32c32-in-1.0", "tiny-f32c8".
            decoder: decoder preset (dcssdae.decoder.DECODERS), e.g. "S", "M", "tiny".
            corruption: the objective: EquilibriumMatching (default, linear decay) or FlowMatching (time-conditioned
                decoder). Choose it with `class_path`.
            encoder_overrides: constructor arguments replacing the encoder preset's (e.g. {double_latent: true}).
            decoder_overrides: constructor arguments replacing the decoder preset's.
            encoder_pretrained: encoder weights to start from (DC-AE / diffusers file or folder), or None.
            sampler: decoding sampler {"method": ..., **settings} (dcssdae.sampling); default 16 EqM descent steps
                on the noise schedule (`DCSSDAE.default_sampler`), or 8 Euler steps for FM.
            sample_posterior: train the decoder on z ~ q(z|x) (True) or on its mean.
            loss_weights: weights of the named loss terms (eqm or fm, lpips or stlpips, repa, kl; distill and
                data for DistillSystem); a term whose weight is 0 is not computed (and its network not loaded). The
                LPIPS and REPA networks load when training starts (`setup("fit")`), not here: a checkpoint opens
                offline.
            lpips_variant: perceptual loss: "lpips" (needs the ImageNet backbone weights) or "stlpips"
                (shift-tolerant LPIPS, weights shipped in its wheel).
            lpips_net: perceptual backbone: "vgg" (SSDD's loss) or "alex".
            repa_encoder: frozen timm encoder whose patch features REPA aligns to (DINOv2-B), when
                loss_weights.repa > 0.
            repa_block: middle-transformer block (0-based) whose tokens REPA aligns (SSDD: 4).
            repa_pretrained: load the REPA encoder's pretrained weights (False: random, tests only).
            trainable: fnmatch patterns over the autoencoder's parameter names ("encoder.*", "decoder.ctx.*");
                only matching parameters train, the rest is frozen. Default: everything.
            init_from: weights to start from (a previous phase's .ckpt, its EMA weights, or an export directory);
                loaded at the start of `fit` unless resuming with --ckpt_path. Strict about shapes.
            optimizer: "adamw" (with linear warm-up, then constant) or "radam_schedulefree" (SSDD's choice).
            lr: learning rate.
            weight_decay: decoupled weight decay of matrices/convolutions (not of norms, biases, embeddings).
            betas: Adam betas.
            warmup_steps: linear learning-rate warm-up (AdamW only).
            lr_schedule: after the warm-up, "constant" or "cosine" (half a cosine from lr to 0 at trainer.max_steps;
                for short runs such as the quick-start; a resume with a larger max_steps stretches the rest of the
                cosine from the learning rate reached, see dcssdae.lr_schedule). AdamW only.
            val_steps: sampler steps for validation (None: the sampler's; 1: the one-step decoder).
            val_extra_steps: step counts also scored at every validation, from the same latents and noise, printed
                and logged beside the model (`val_<n>step/*`), e.g. [1]: the one-step decoder (the posterior mean
                of an undistilled EqM model) next to the sampling default. `[]` turns them off (with --ckpt_path,
                None keeps the checkpoint's).
            val_rfid: compute rFID at validation (TF-Inception features); reported from 2048 images (comparable with
                published rFID on 50k), omitted on smaller sets (`rfid_omitted` says so).
            val_kid: compute KID (and its standard deviation over subsets) on the same Inception features, the
                statistic that fits small sets; None: when val_rfid is on.
            val_lpips: perceptual metric(s) at validation: "lpips", "stlpips_alex" (or "stlpips"), "stlpips_vgg", a
                list of them (both ST-LPIPS variants also report `stlpips`, their mean), or None.
            val_baseline: also score a baseline codec at the latent's budget on the same images and print it beside
                the model (`dcssdae.baselines`; "bicubic": bicubic down- and up-sampling keeping as many scalars as
                the latent), or None. Measured once per `fit` (its validations see the same images) and at every
                `validate` / `test`.
            val_seed: seed of the validation noise: image i's noise is drawn from (val_seed, its key), the same at
                every validation and on any number of processes.
            predict_dir: where `dcssdae predict` writes `<key>.png` = input | reconstruction, relative to the run's log
                dir (lightning_logs/version_N) or absolute; None: write nothing (`trainer.predict` then returns
                the reconstructions themselves).
        """
        super().__init__()
        self.save_hyperparameters()
        self.ae = DCSSDAE(encoder, decoder, build_corruption(corruption), encoder_overrides, decoder_overrides,
                          sampler, encoder_pretrained=encoder_pretrained)
        # A checkpoint must load with weights_only=True: keep the corruption as a {class_path, init_args} dict.
        self.hparams["corruption"] = corruption_config(self.ae.corruption)
        self.corruption = self.ae.corruption
        if isinstance(loss_weights, dict):  # from a checkpoint's hparams
            loss_weights = LossWeights(**loss_weights)
        self.loss_weights = loss_weights or LossWeights()
        self.hparams["loss_weights"] = dataclasses.asdict(self.loss_weights)
        self.sample_posterior = sample_posterior
        self.trainable = list(trainable or ["*"])
        self.init_from = init_from
        self.optimizer_name, self.lr, self.weight_decay, self.betas = optimizer, lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.val_steps, self.val_seed = val_steps, val_seed
        extra = list(val_extra_steps or [])
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in extra):
            raise ValueError(f"val_extra_steps must be step counts >= 1, got {extra}")
        self.val_extra_steps = sorted(set(extra))
        for steps in self.val_extra_steps:
            self.ae.sampler_settings(steps=steps)  # a count the sampler cannot take raises here, not later
        self.predict_dir = predict_dir

        # Auxiliary losses: built only when weighted (no VGG / DINOv2 load otherwise).
        weights = self.loss_weights
        self.lpips = LPIPSLoss(lpips_net, lpips_variant) if getattr(weights, lpips_variant) > 0 else None
        self.repa = None
        if weights.repa > 0:
            block = min(repa_block, self.ae.decoder.mid_depth - 1)
            self.repa = REPALoss(self.ae.decoder.mid_dim, repa_encoder, block, pretrained=repa_pretrained)
        # The validation table (columns: the model, the extra step counts, the baseline). Its frozen networks are
        # built at the first evaluation batch, once for every column, without drawing from the training stream.
        self.val_baseline = val_baseline
        self.val_metrics = ReconstructionMetrics(rfid=val_rfid, lpips_variant=val_lpips, kid=val_kid)
        self.baseline_result: dict | None = None  # the baseline's metrics, once measured (the same every time)

        self.freeze_except(self.trainable)

    # ------------------------------------------------------------------------------------------------
    # What trains.

    def freeze_except(self, patterns: list[str]) -> None:
        """requires_grad only for autoencoder parameters whose name matches one of `patterns` (fnmatch)."""
        names = [name for name, _ in self.ae.named_parameters()]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"trainable pattern {pattern!r} matches no autoencoder parameter; names look like "
                                 f"{names[0]!r} ... {names[-1]!r} (see `DCSSDAESystem(...).ae.named_parameters()`)")
        for name, p in self.ae.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))

    @property
    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.ae.encoder.parameters())

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Autoencoder parameters that train, plus the REPA projection head when REPA is on."""
        named = [(f"ae.{n}", p) for n, p in self.ae.named_parameters() if p.requires_grad]
        if self.repa is not None:
            named += [(f"repa.{n}", p) for n, p in self.repa.named_parameters() if p.requires_grad]
        return named

    # ------------------------------------------------------------------------------------------------
    # Weights of an earlier phase (init_from) and the per-rank noise.

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        f = self.ae.encoder.downsample_factor
        for name in ("image_size", "val_image_size"):
            size = getattr(datamodule, name, None)
            if size is not None and size % f:
                raise ValueError(f"data.{name} {size} is not divisible by the encoder's downsampling factor {f} "
                                 f"(encoder {self.hparams.encoder!r}): use a multiple of {f}")
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None:
            self.load_init_weights(self.init_from)
        self.load_frozen_networks(stage)
        # Lightning warns about modules left in eval mode at the start of fit: ours are frozen on purpose (the
        # metric networks, a distillation teacher).
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    def load_frozen_networks(self, stage: str) -> None:
        """Build the frozen networks that training uses (LPIPS / DINOv2) and check the weight files of the metric
        networks (built when an evaluation first needs them). Not at construction: a checkpoint opens without their
        weights; a missing file is reported here, before the first step."""
        if stage == "fit":
            for loss in (self.lpips, self.repa):
                if loss is not None:
                    loss.load()
        if stage in ("fit", "validate", "test"):  # the metric networks are built at the first evaluation batch
            problems = self.val_metrics.check()
            if problems:
                raise FileNotFoundError("validation metrics: " + "; ".join(problems))

    def load_init_weights(self, path: str) -> None:
        """Load autoencoder weights (EMA when the checkpoint has them) from a .ckpt or an export directory.

        Shapes must match exactly; missing and unexpected names are reported (missing ones keep their init).
        """
        config, state = load_weights(path)
        own = self.ae.state_dict()
        state = _grow_output_rows(state, own, path)
        mismatched = [f"{k}: {tuple(v.shape)} in {Path(path).name}, {tuple(own[k].shape)} here"
                      for k, v in state.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            raise ValueError(f"init_from {path}: shape mismatch (different encoder/decoder config?):\n  "
                             + "\n  ".join(mismatched))
        self.check_corruption(config.get("corruption"), path, strict=False)  # a new phase may change objective
        report = self.ae.load_state_dict(state, strict=False)
        loaded = len(state) - len(report.unexpected_keys)
        rank_zero_info(f"init_from {path}: loaded {loaded} of the autoencoder's {len(own)} tensors")
        if report.missing_keys:
            rank_zero_warn(f"init_from {path}: {len(report.missing_keys)} tensors NOT loaded (they keep their "
                           f"initialisation): {', '.join(report.missing_keys)}")
        if report.unexpected_keys:
            rank_zero_warn(f"init_from {path}: {len(report.unexpected_keys)} tensors of the file have no place in "
                           f"this network (ignored): {', '.join(report.unexpected_keys)}")
        self.init_report = {"loaded": loaded, "missing": report.missing_keys, "unexpected": report.unexpected_keys}

    def on_train_start(self) -> None:
        # seed_everything gives every rank the same seed: offset it so that each rank draws its own noise (StepSeed,
        # when present, then reseeds every batch from (seed, rank, epoch, batch index)).
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.global_rank)

    # ------------------------------------------------------------------------------------------------
    # Training: the data flow.

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]                                                  # (B, 3, S, S) in [-1, 1]
        with torch.set_grad_enabled(self.encoder_trains):
            posterior = self.ae.encoder(x)                                  # q(z | x)
        z = posterior.sample() if self.sample_posterior else posterior.mode()   # (B, c, S/f, S/f)
        noise = torch.randn_like(x)
        level = self.corruption.sample_level(x)                             # EqM: gamma ~ U[0,1); FM: t
        x_t = self.corruption.corrupt(x, noise, level)                      # decoder input
        tokens_at = self.repa.block if self.repa is not None else None
        out = self.ae.decoder(x_t, z, self.corruption.decoder_time(level), return_tokens_at=tokens_at)
        out, tokens = out if tokens_at is not None else (out, None)         # network output, (B, N, D)
        pred = self.corruption.pred(x_t, out)                               # field / velocity
        x0_hat = self.corruption.to_x0(x_t, pred, level)                    # one-step estimate of x
        target = self.corruption.target(x, noise, level)
        terms = {self.corruption.name: self.corruption.loss(pred, target).mean()}   # "eqm" or "fm"
        if self.lpips is not None:
            terms[self.lpips.name] = self.lpips(x0_hat, x).mean()           # "lpips" or "stlpips"
        if self.repa is not None:
            terms["repa"] = self.repa(tokens, x).mean()
        if self.encoder_trains and self.loss_weights.kl > 0:
            terms["kl"] = kl_loss(posterior)
        if self.loss_weights.lowpass > 0:
            terms["lowpass"] = lowpass_loss(x0_hat, x)
        return self.log_loss(terms)

    def log_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted total (`LossWeights.total`); logs every term, the total and the learning rate."""
        loss = self.loss_weights.total(terms)
        self.last_terms = {k: v.detach() for k, v in terms.items()}  # read by dcssdae.nonfinite_guard.NonFiniteGuard
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, prog_bar=False)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for _, p in self.trained_parameters() if p.grad is not None]
        if grads:  # before clipping (Lightning clips after this hook)
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))),
                     on_step=True)

    # ------------------------------------------------------------------------------------------------
    # Validation (and `dcssdae test`): encode (posterior mean), decode from fixed-seed noise with the validation
    # sampler, accumulate the metrics; report them at the end (and write them as JSON for validate / test).

    def val_sampler(self) -> dict[str, Any]:
        return self.ae.sampler_settings(steps=self.val_steps)

    def val_inputs(self, x: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, noise) for validation: the posterior mean, and each image's noise drawn from (val_seed, its key)
        (`dcssdae.metrics.keyed_noise`): the same for an image whatever its batch, rank or number of processes."""
        return self.ae.encode(x), keyed_noise(x, keys, self.val_seed)

    def val_decode(self, z: torch.Tensor, noise: torch.Tensor,
                   steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat in [-1, 1], nfe) with the validation sampler; `steps` replaces its step count."""
        sampler = self.val_sampler() if steps is None else self.ae.sampler_settings(steps=steps)
        x_hat, nfe = self.ae.decode(z, noise=noise, return_nfe=True, **sampler)
        return x_hat.float().clamp(-1, 1), nfe

    def reconstruct(self, x: torch.Tensor, keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat in [-1, 1], nfe) from the validation latent and noise: the same images every time. `keys`: the
        images' keys (default: a digest of each image)."""
        return self.val_decode(*self.val_inputs(x, image_keys(x, keys)))

    @staticmethod
    def steps_label(steps: int) -> str:
        """The table column of an extra step count: "1 step", "4 steps"."""
        return f"{steps} step" + ("s" if steps != 1 else "")

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch["image"]
        keys = image_keys(x, batch.get("key"))
        z, noise = self.val_inputs(x, keys)  # encoded once, shared by every decoder scored
        x_hat, nfe = self.val_decode(z, noise)
        self.val_metrics.update(x_hat, x, nfe, keys=keys)
        for steps in self.val_extra_steps:
            x_extra, nfe_extra = self.val_decode(z, noise, steps)
            self.val_metrics.update(x_extra, x, nfe_extra, column=self.steps_label(steps), keys=keys)
        if self.val_baseline and not (self._baseline_reusable() and self.baseline_result is not None):
            encoder = self.ae.encoder
            x_base = baseline(self.val_baseline, x, encoder.latent_channels, encoder.downsample_factor)
            self.val_metrics.update(x_base, x, column=self.val_baseline, keys=keys)
        return {"x": x, "x_hat": x_hat}

    test_step = validation_step

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Reconstructions with the validation sampler (`val_steps`) and noise, as `dcssdae validate` makes them:
        {"key": [str], "x_hat": (B, 3, S, S) in [-1, 1], "psnr": (B,) dB on the 8-bit images, "nfe": (B,)}.

        `dcssdae predict --config CONFIG --ckpt_path CKPT` runs it over the data module's predict images (the
        validation set, each image once across ranks) with the checkpoint's EMA weights, and `ReconstructionWriter`
        writes every image as `<log dir>/<predict_dir>/<key>.png` = input | reconstruction.
        """
        x = batch["image"]
        x_hat, nfe = self.reconstruct(x, batch.get("key"))
        psnr, _ = psnr_uint8(quantize_uint8(x_hat), quantize_uint8(x))
        return {"key": list(batch["key"]), "x_hat": x_hat, "psnr": psnr.float(), "nfe": nfe}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Prediction (`dcssdae predict`, `trainer.predict`) writes its PNGs, unless predict_dir is None."""
        if self.predict_dir is None or self._trainer is None or self.trainer.state.fn != "predict":
            return []
        return [ReconstructionWriter(self.predict_dir)]

    def on_validation_epoch_end(self) -> None:
        self.report_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.report_metrics("test")

    def _baseline_reusable(self) -> bool:
        """fit validates the same images every time: its baseline is measured once (not on the sanity check) and
        reused; validate / test measure it every time."""
        return self.trainer.state.fn.value == "fit" and not self.trainer.sanity_checking

    def report_metrics(self, stage: str) -> None:
        """Compute every column (a collective: every rank, the same columns), log the numbers, print the table and,
        for validate / test, write `<log dir>/{validate,test}_metrics.json`."""
        metrics = self.val_metrics.compute()  # synchronised over ranks
        self._log_column(stage, metrics)
        others = {}
        for steps in self.val_extra_steps:
            label = self.steps_label(steps)
            others[label] = self.val_metrics.compute(label)
            self._log_column(f"{stage}_{steps}step", others[label])
        if self.val_baseline:
            reusable = self._baseline_reusable()
            result = self.baseline_result if reusable else None
            if result is None:
                result = self.val_metrics.compute(self.val_baseline)
                if reusable:
                    self.baseline_result = result
            others[self.val_baseline] = result
            self._log_column(f"{stage}_{self.val_baseline}", result)
        self.val_metrics.reset()
        if others and self.trainer.is_global_zero and self.trainer.state.fn.value == "fit":
            print(f"\n{stage} at step {self.global_step}:\n" + format_table(metrics, others))
        command = self.trainer.state.fn.value  # "fit", "validate", "test"
        if command in ("validate", "test"):
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
            if self.trainer.is_global_zero:
                out = Path(log_dir or self.trainer.default_root_dir) / f"{command}_metrics.json"
                ckpt_path = self.trainer.ckpt_path
                write_json({**metrics, "sampler": self.val_sampler(),  # what was scored, and with what
                            "checkpoint": str(Path(ckpt_path).absolute()) if ckpt_path else None,
                            "checkpoint_global_step": getattr(self, "loaded_global_step", None), **others}, out)
                print(format_table(metrics, others) + f"\nwritten to {out}")

    def _log_column(self, prefix: str, metrics: dict[str, Any]) -> None:
        """Log a column's numbers as `<prefix>/<name>` (intervals as `<name>_ci95_lo` / `_hi`; text left out)."""
        scalars = {}
        for name, value in metrics.items():
            if isinstance(value, (list, tuple)) and len(value) == 2:
                scalars[f"{prefix}/{name}_lo"], scalars[f"{prefix}/{name}_hi"] = map(float, value)
            elif isinstance(value, (int, float)):
                scalars[f"{prefix}/{name}"] = float(value)
        # identical on every rank already; sync_dist only keeps Lightning's DDP bookkeeping happy
        self.log_dict(scalars, sync_dist=True)

    # ------------------------------------------------------------------------------------------------
    # Optimiser: only the trained parameters; no decay for norms, biases, embeddings.

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.trained_parameters():
            (no_decay if p.ndim < 2 or any(s in name for s in NO_DECAY_NAMES) else decay).append(p)
        if not decay and not no_decay:
            raise ValueError(f"nothing to train: trainable patterns {self.trainable} leave every parameter frozen")
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_name == "radam_schedulefree":
            import schedulefree

            return schedulefree.RAdamScheduleFree(groups, lr=self.lr, betas=self.betas)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        warmup, total = max(1, self.warmup_steps), self.trainer.max_steps if self._trainer is not None else -1
        if self.lr_schedule == "cosine" and (total is None or total <= warmup):
            raise ValueError(f"lr_schedule 'cosine' decays to 0 at trainer.max_steps: set max_steps > warmup_steps "
                             f"({warmup}), got {total}")
        # warm-up, then constant or cosine to 0 at max_steps; an extension (--ckpt_path with another max_steps)
        # continues from the learning rate reached: dcssdae.lr_schedule
        schedule = LRSchedule(optimizer, warmup, self.lr_schedule, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # Schedule-free optimisers evaluate at their averaged iterate: switch them around validation. These hooks run
    # before / after the EMA callback's swaps (model_eval precedes on_validation_epoch_start).
    def _schedule_free(self):
        if self.optimizer_name != "radam_schedulefree" or self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[0]

    def on_train_epoch_start(self) -> None:
        if (optimizer := self._schedule_free()) is not None:
            optimizer.train()

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        if (optimizer := self._schedule_free()) is not None:
            optimizer.eval()

    def on_validation_model_train(self) -> None:
        super().on_validation_model_train()
        if (optimizer := self._schedule_free()) is not None:
            optimizer.train()

    # ------------------------------------------------------------------------------------------------
    # Checkpoints describe the network they hold (see dcssdae.callbacks for where the EMA weights live).

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dcssdae_config"] = self.ae.config()

    def check_corruption(self, saved: dict | None, path: str, strict: bool = True) -> None:
        """Weights trained with another corruption (objective, decay, lambda, parameterisation) would have their
        output read as something else (e.g. an image taken for a field): refuse them (`strict`, resuming or a
        distillation teacher) or warn (`init_from`, where a new phase may deliberately change the objective).
        Settings that only choose the training levels (EqM noise_power, FM logit_mean / logit_std) may differ."""
        if saved is None:
            return
        theirs = network_corruption_config(build_corruption(saved))
        ours = network_corruption_config(self.corruption)
        if theirs != ours:
            message = (f"{path} was trained with corruption {theirs} but this run uses {ours}: the decoder's output "
                       f"means something else ({corruption_difference(saved, theirs, ours)})")
            if strict:
                raise ValueError(message + "; set model.corruption to match")
            rank_zero_warn(message + " (initialising from it anyway)")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, *, weights: Literal["ema", "live"] = "ema", **kwargs):
        """The system of a `dcssdae fit` checkpoint, in eval mode, holding the weights that validation and
        `dcssdae export` use: the EMA of the weights (`weights="ema"`, the default). `weights="live"` gives the
        training weights instead (those a resume continues from). A checkpoint of a run without EMA holds only its
        training weights, which both give (with a warning for "ema"). Other arguments: Lightning's
        `LightningModule.load_from_checkpoint` (keyword arguments replace saved hyperparameters).

            model = DCSSDAESystem.load_from_checkpoint("runs/quickstart/checkpoints/last.ckpt")
            x_hat = model.ae.decode(model.ae.encode(x))   # = the export's decode, given the same noise
        """
        if weights not in ("ema", "live"):
            raise ValueError(f"weights must be 'ema' (what validation and export use) or 'live', got {weights!r}")
        token = _LOAD_WEIGHTS.set(weights)
        try:
            model = super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only,
                                                 **kwargs)
        finally:
            _LOAD_WEIGHTS.reset(token)
        return model.eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        weights = _LOAD_WEIGHTS.get()  # set by load_from_checkpoint only (see dcssdae.callbacks for the layout)
        if weights == "live" and "current_model_state" in checkpoint:
            checkpoint["state_dict"] = dict(checkpoint["current_model_state"])
        elif weights == "ema" and "current_model_state" not in checkpoint:
            rank_zero_warn("the checkpoint has no EMA weights (trained without EMA): loading its training weights")
        self.loaded_global_step = checkpoint.get("global_step")  # recorded in validate / test metrics JSON
        self.use_own_optimizer_settings(checkpoint)
        path = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        self.check_corruption(checkpoint.get("dcssdae_config", {}).get("corruption"), str(path))
        # Resuming needs the very same network: say so plainly, before torch lists every size mismatch.
        own, saved = self.ae.state_dict(), checkpoint.get("state_dict", {})
        saved = {k[len("ae."):]: v for k, v in saved.items() if k.startswith("ae.")}
        differ = sorted(own.keys() ^ saved.keys()) + [k for k in own.keys() & saved.keys()
                                                       if own[k].shape != saved[k].shape]
        if differ:
            path = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
            raise ValueError(f"{path} holds another network than this config ({len(differ)} autoencoder tensors "
                             f"differ, e.g. {', '.join(differ[:3])}). --ckpt_path resumes the same run; to start a "
                             f"new one from its weights use --model.init_args.init_from {path}")

    def use_own_optimizer_settings(self, checkpoint: dict[str, Any]) -> None:
        """Resuming restores the optimiser's saved hyperparameters; put this run's in their place (the same values
        unless given anew with --ckpt_path, see dcssdae.cli): weight decay and betas per group, and the learning rate
        of the schedule-free optimiser (AdamW's comes from its schedule, dcssdae.lr_schedule)."""
        for state in checkpoint.get("optimizer_states") or []:
            for group, decay in zip(state.get("param_groups", []), (self.weight_decay, 0.0)):
                group.update(weight_decay=decay, betas=tuple(self.betas))
                if self.optimizer_name == "radam_schedulefree":
                    group["lr"] = self.lr


# ------------------------------------------------------------------------------------------------
# `dcssdae predict` output: one PNG per image, input | reconstruction (as `dcssdae reconstruct` writes them).


class ReconstructionWriter(pl.Callback):
    """Writes each predicted image as `<folder>/<key>.png`: the input and its reconstruction side by side (8-bit).

    Every rank writes its own images (the predict data holds each image once across ranks). Once written, a batch's
    reconstructions are dropped from the prediction (its "x_hat" becomes "png", the written paths), so that predicting
    a large set does not hold every image in memory. (A plain callback rather than Lightning's BasePredictionWriter,
    which looks for sample indices that a streaming data set does not have, and warns.)
    """

    def __init__(self, folder: str = "reconstructions") -> None:
        """
        Args:
            folder: relative to the run's log dir (lightning_logs/version_N), or absolute.
        """
        self.folder, self.out_dir, self.written = folder, None, 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self.out_dir, self.written = (Path(log_dir or trainer.default_root_dir) / self.folder).absolute(), 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_predict_batch_end(self, trainer, pl_module, prediction, batch, batch_idx, dataloader_idx=0) -> None:
        # (Lightning calls this before it keeps `prediction` for the return value of trainer.predict.)
        from dcssdae.reconstruct import save_pair_png

        x_u8, x_hat_u8 = quantize_uint8(batch["image"]), quantize_uint8(prediction.pop("x_hat"))
        paths = []
        for key, a, b in zip(prediction["key"], x_u8, x_hat_u8):
            path = self.out_dir / (str(key).replace("/", "_").replace("\\", "_") + ".png")
            save_pair_png(a, b, path)
            paths.append(str(path))
        prediction["png"] = paths
        self.written += len(paths)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = "this rank" if trainer.world_size > 1 else "all"
        print(f"wrote {self.written} reconstructions ({where}; input | reconstruction) to {self.out_dir}")
