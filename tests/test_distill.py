"""Distillation without the CLI: the teacher is checked when the run starts and verified when it resumes, student and
teacher share one frozen encoder, the EMA averages only what trains, and old and new checkpoints resume and export.
Tiny presets, random in-memory images (helpers from test_system)."""

import lightning.pytorch as pl
import pytest
import torch
from test_system import TINY, loader, save_checkpoint

from dcssdae.autoencoder import DCSSDAE
from dcssdae.callbacks import EMA
from dcssdae.distill import DistillSystem, weights_sha256
from dcssdae.export import read_checkpoint
from dcssdae.losses import LossWeights
from dcssdae.objectives import EquilibriumMatching, FlowMatching

DISTILL = {**TINY, "trainable": ["decoder.*"], "teacher_steps": 2,
           "loss_weights": LossWeights(distill=1.0, stlpips=0.0, repa=0.0, kl=0.0)}


def teacher_file(path, seed: int = 0, **kwargs):
    """A saved tiny teacher with a non-zero output layer (the initialisation predicts 0)."""
    torch.manual_seed(seed)
    ae = DCSSDAE("tiny-f32c8", "tiny", **kwargs)
    torch.nn.init.normal_(ae.decoder.out_conv.weight, std=0.1)
    return str(save_checkpoint(ae, path))


def distill_fit(model, root, steps, ckpt_path=None, callbacks=()):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=root, callbacks=[EMA(decay=0.5), pl.callbacks.ModelCheckpoint(
                             dirpath=root, save_last=True, save_top_k=0), *callbacks])
    trainer.fit(model, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer


# ------------------------------------------------------------------------------------------------
# The teacher: checked at the start, verified on resume.


@pytest.mark.parametrize("corruption, expected", [
    (FlowMatching(), "FlowMatching there, EquilibriumMatching here"),
    (EquilibriumMatching(parameterization="field"), "parameterization: 'field' there, 'denoiser' here"),
])
def test_a_teacher_of_another_corruption_is_refused_when_the_run_starts(tmp_path, corruption, expected):
    model = DistillSystem(**DISTILL, init_from=teacher_file(tmp_path / "teacher.ckpt", corruption=corruption))
    with pytest.raises(ValueError, match=f"{expected}.*set model.corruption to match"):
        distill_fit(model, tmp_path, 1)


def test_a_teacher_saved_before_the_parameterization_option_is_refused_for_a_denoiser(tmp_path):
    """Its config has no `parameterization`: it loads as `field` (its network outputs the field), which a `denoiser`
    run would read as an image."""
    path = teacher_file(tmp_path / "old.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["dcssdae_config"]["corruption"]["init_args"]["parameterization"]
    torch.save(checkpoint, path)
    model = DistillSystem(**DISTILL, init_from=path)
    with pytest.raises(ValueError, match=r"saved before the `parameterization` option, so its network outputs the "
                                         r"field itself\); set model.corruption to match"):
        distill_fit(model, tmp_path, 1)
    # the same teacher under a field config distils
    field = DistillSystem(**DISTILL, init_from=path, corruption=EquilibriumMatching(parameterization="field"))
    distill_fit(field, tmp_path / "field", 1)


def test_the_checkpoint_records_its_teacher_and_a_changed_teacher_file_is_refused_on_resume(tmp_path):
    path = teacher_file(tmp_path / "phase3.ckpt", seed=0)
    distill_fit(DistillSystem(**DISTILL, init_from=path), tmp_path / "run", 1)
    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    teacher_state = {k[len("ae."):]: v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    assert checkpoint["distill_teacher"] == {"path": path, "global_step": None, "sha256": weights_sha256(teacher_state)}
    # the same teacher: the run goes on
    distill_fit(DistillSystem(**DISTILL, init_from=path), tmp_path / "run", 2, tmp_path / "run" / "last.ckpt")
    # phase 3's last.ckpt rewritten since (another model at the same path): refused, naming both
    teacher_file(tmp_path / "phase3.ckpt", seed=1)
    with pytest.raises(ValueError, match=rf"init_from {path} \(step None, weights sha256 [0-9a-f]{{12}}\) is not the "
                                         rf"teacher this run was distilled from: {path} \(step None"):
        distill_fit(DistillSystem(**DISTILL, init_from=path), tmp_path / "run", 3, tmp_path / "run" / "last.ckpt")


# ------------------------------------------------------------------------------------------------
# Memory: one encoder; the EMA of what trains.


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (shared parameters counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_distillation_holds_one_encoder_and_the_ema_averages_only_the_student_decoder(tmp_path):
    model = DistillSystem(**DISTILL, init_from=teacher_file(tmp_path / "teacher.ckpt"))
    ae = DCSSDAE("tiny-f32c8", "tiny")
    encoder, decoder = (unique_bytes(m.state_dict().values()) for m in (ae.encoder, ae.decoder))
    # the student (encoder + decoder) and the teacher's decoder: the encoder once
    assert unique_bytes(list(model.parameters()) + list(model.buffers())) == encoder + 2 * decoder
    assert model.teacher.encoder is model.ae.encoder and model.teacher.decoder is not model.ae.decoder
    ema = EMA(decay=0.9)
    trainer = distill_fit(model, tmp_path / "run", 1)
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    trained = [p for p in model.ae.parameters() if p.requires_grad]
    assert unique_bytes(ema.ema) == unique_bytes(trained) == decoder
    assert sum(t.numel() for t in ema.ema) == sum(p.numel() for p in trained)


class Snapshot(pl.Callback):
    """The module's state when training starts (after setup loaded the teacher)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_optimiser_steps_move_the_student_decoder_and_neither_the_teacher_nor_the_shared_encoder(tmp_path):
    """(The teacher takes no gradient by construction; what matters is that nothing of it shares the student's
    trained weights.)"""
    model = DistillSystem(**{**DISTILL, "lr": 1e-2}, init_from=teacher_file(tmp_path / "teacher.ckpt"))
    distill_fit(model, tmp_path / "run", 2, callbacks=[snapshot := Snapshot()])
    after = model.state_dict()  # the module holds the EMA after fit: EMA of the student, the teacher as it was
    changed = {k for k, v in snapshot.state.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("ae.decoder.") for k in changed), sorted(changed)[:5]
    assert torch.equal(snapshot.state["teacher.decoder.out_conv.weight"], snapshot.state["ae.decoder.out_conv.weight"])


# ------------------------------------------------------------------------------------------------
# Old and new checkpoints resume and export.


def test_old_and_new_distillation_checkpoints_resume_and_export(tmp_path):
    """New: the EMA holds the student's decoder only (its state_dict still has every ae.* entry) and the teacher's
    identity is recorded (its resume: test above). Old (written when the EMA averaged every weight, no identity): the
    frozen encoder's average is the encoder itself, so the same layout; it resumes with a warning that its teacher
    cannot be checked. Both export the EMA weights."""
    path = teacher_file(tmp_path / "phase3.ckpt")
    distill_fit(DistillSystem(**DISTILL, init_from=path), tmp_path / "new", 1)
    new = tmp_path / "new" / "last.ckpt"
    checkpoint = torch.load(new, weights_only=True)
    state = checkpoint["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert {k[len("ae."):] for k in state} == set(DCSSDAE("tiny-f32c8", "tiny").state_dict())
    del checkpoint["distill_teacher"]
    torch.save(checkpoint, old := tmp_path / "old.ckpt")
    for ckpt in (new, old):
        _, weights, _ = read_checkpoint(ckpt)
        assert torch.equal(weights["decoder.out_conv.weight"], state["ae.decoder.out_conv.weight"])
    model = DistillSystem(**DISTILL, init_from=path)
    with pytest.warns(UserWarning, match="predates teacher identities"):
        distill_fit(model, tmp_path / "resumed_old", 2, old)
    assert model.global_step == 2
    teacher = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, teacher[f"ae.{k}"]) for k, v in model.teacher.decoder.state_dict(
        prefix="decoder.").items())
