"""DCSSDAESystem / DistillSystem / callbacks without the CLI: what trains, the optimiser groups, per-rank noise,
init_from and unreadable weight files, the EMA and its place in checkpoints, one-step distillation targets,
predictions. Tiny presets, random in-memory images."""

import copy
import fnmatch
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dcssdae.autoencoder import DCSSDAE, WeightsFileError, load_weights
from dcssdae.callbacks import EMA
from dcssdae.checkpointing import StepSeed
from dcssdae.decoder import build_decoder
from dcssdae.distill import DistillSystem
from dcssdae.encoders import build_encoder
from dcssdae.losses import LossWeights
from dcssdae.objectives import EquilibriumMatching, FlowMatching
from dcssdae.system import DCSSDAESystem

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"encoder": "tiny-f32c8", "decoder": "tiny", "lpips_variant": "stlpips", "lpips_net": "alex",
        "val_rfid": False, "val_lpips": None, "val_steps": 1, "loss_weights": LossWeights(repa=0.0)}


def shipped_trainable(name: str) -> list[str]:
    return yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["trainable"]


class RandomImages(Dataset):
    def __init__(self, n=4, size=64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": -1, "key": str(i)}


def loader(n=4):
    return DataLoader(RandomImages(n), batch_size=2)


def fit(model, steps=2, callbacks=(), root=None, **kwargs):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=root, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(2))
    return trainer


# ------------------------------------------------------------------------------------------------
# What trains.


@pytest.mark.parametrize("config", ["phase2.yaml", "phase3.yaml", "distill.yaml"])
def test_shipped_trainable_patterns_match_real_and_tiny_networks(config):
    """Every pattern of the shipped phase configs selects parameters of the real GPU networks (built on the meta
    device: names only) and of the tiny test presets, and leaves others frozen."""
    patterns = shipped_trainable(config)
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())["model"]["init_args"]
    for encoder, decoder in ((base["encoder"], base["decoder"]), ("tiny-f32c8", "tiny")):
        with torch.device("meta"):
            enc = build_encoder(encoder, double_latent=True)
            dec = build_decoder(decoder, enc.latent_channels)
        names = [f"encoder.{n}" for n, _ in enc.named_parameters()] + [f"decoder.{n}" for n, _ in dec.named_parameters()]
        for pattern in patterns:
            assert any(fnmatch.fnmatchcase(n, pattern) for n in names), f"{config}: {pattern} matches nothing"
        frozen = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        assert frozen, f"{config}: the patterns train everything"


def test_unknown_pattern_is_an_error():
    with pytest.raises(ValueError, match="matches no autoencoder parameter"):
        DCSSDAESystem(**TINY, trainable=["encoder.no_such_layer.*"])


def test_phase2_freezing_keeps_frozen_weights_identical_after_steps():
    model = DCSSDAESystem(**TINY, trainable=shipped_trainable("phase2.yaml"), lr=1e-2)
    before = copy.deepcopy(model.ae.state_dict())
    trained = {n for n, p in model.ae.named_parameters() if p.requires_grad}
    assert trained and len(trained) < len(before)
    fit(model, steps=3)
    after = model.ae.state_dict()
    for name, value in before.items():
        if name in trained:
            continue
        assert torch.equal(value, after[name]), f"frozen {name} changed"
    changed = [n for n in trained if not torch.equal(before[n], after[n])]
    assert changed, "no trainable weight moved"


def test_optimizer_gets_only_trained_parameters_with_no_decay_group():
    model = DCSSDAESystem(**TINY, trainable=["decoder.*"], weight_decay=0.1)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    trained = {id(p) for p in model.ae.decoder.parameters()}
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert ids == trained  # the frozen encoder is not in the optimiser
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.ae.decoder.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("rel_bias") for n in no_decay_names)  # position tables: no decay
    assert any("norm" in n for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)


def test_schedule_free_radam_trains_and_validates():
    import schedulefree

    model = DCSSDAESystem(**TINY, optimizer="radam_schedulefree", lr=1e-3)
    before = model.ae.decoder.out_conv.weight.detach().clone()
    trainer = fit(model, steps=6, val_check_interval=2)  # RAdam skips its first steps (variance rectification)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, schedulefree.RAdamScheduleFree)
    assert optimizer.param_groups[0]["train_mode"]  # switched back to train mode after validation
    assert not torch.equal(before, model.ae.decoder.out_conv.weight)


def test_gated_denoiser_trains_validates_and_its_checkpoint_rebuilds_the_gate_channel(tmp_path):
    """EqM `gated`: the system trains the 4-channel decoder (the gate's weights move), validates, and its export
    loads into a DCSSDAE whose one-step decode equals the trained model's."""
    corruption = EquilibriumMatching(parameterization="gated")
    model = DCSSDAESystem(**{**TINY, "corruption": corruption}, lr=1e-3)
    assert model.ae.decoder.out_conv.out_channels == 4
    before = model.ae.decoder.out_conv.weight.detach().clone()
    trainer = fit(model, steps=2, val_check_interval=2)
    assert not torch.equal(before[3], model.ae.decoder.out_conv.weight[3])  # the gate channel trains
    from dcssdae.export import export_checkpoint

    path = tmp_path / "gated.ckpt"
    trainer.save_checkpoint(path)
    loaded = DCSSDAE.from_pretrained(export_checkpoint(path, tmp_path / "export", ema=False))
    assert loaded.corruption.parameterization == "gated" and loaded.decoder.out_conv.out_channels == 4
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    noise = torch.randn_like(x)
    with torch.no_grad():
        expected = model.ae.eval().decode(model.ae.encode(x), noise=noise, steps=1)
        torch.testing.assert_close(loaded.decode(loaded.encode(x), noise=noise, steps=1), expected)


def test_kl_only_when_the_encoder_trains():
    model = DCSSDAESystem(**TINY, trainable=["decoder.*"])
    terms = {}
    model.log_loss = lambda t: terms.update(t) or sum(t.values())
    model.training_step({"image": RandomImages(2)[0]["image"][None].repeat(2, 1, 1, 1)}, 0)
    assert "kl" not in terms and {"eqm", "stlpips"} <= set(terms)


# ------------------------------------------------------------------------------------------------
# Noise: every DDP rank draws its own, reproducibly per (seed, rank, step).


def test_every_rank_draws_its_own_noise_reproducibly_per_seed_rank_and_step(monkeypatch):
    """StepSeed (always on in the CLI) reseeds before each training batch from (seed, rank, epoch, batch index): the
    corruption noise and levels of training_step differ between ranks and steps, and repeat for the same inputs."""
    model = DCSSDAESystem(**{**TINY, "loss_weights": LossWeights(stlpips=0.0, repa=0.0)})
    batch = {"image": RandomImages(2)[0]["image"][None].repeat(2, 1, 1, 1)}
    drawn, corrupt = [], model.corruption.corrupt
    monkeypatch.setattr(model.corruption, "corrupt", lambda x, noise, level: drawn.append((noise, level))
                        or corrupt(x, noise, level))

    def draw(seed: int, rank: int, batch_idx: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = SimpleNamespace(global_rank=rank, current_epoch=epoch)  # all StepSeed reads of the trainer
        StepSeed(seed).on_train_batch_start(trainer, model, batch, batch_idx)
        model.training_step(batch, batch_idx)
        return drawn[-1]

    noise, level = draw(seed=0, rank=0, batch_idx=5)
    for other in (draw(0, 1, 5), draw(0, 0, 6), draw(0, 0, 5, epoch=1), draw(1, 0, 5)):  # rank, step, epoch, seed
        assert not torch.equal(other[0], noise) and not torch.equal(other[1], level)
    again = draw(0, 0, 5)
    assert torch.equal(again[0], noise) and torch.equal(again[1], level)
    assert not torch.equal(draw(0, 1, 5)[0], draw(0, 2, 5)[0])

    # Without StepSeed (the Python API with seed_everything: the same seed on every rank), on_train_start offsets the
    # seed by the rank.
    def first_draw(rank: int) -> torch.Tensor:
        torch.manual_seed(0)
        model._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        model.on_train_start()
        model._trainer = None
        model.training_step(batch, 0)
        return drawn[-1][0]

    assert not torch.equal(first_draw(0), first_draw(1))
    assert torch.equal(first_draw(1), first_draw(1))


# ------------------------------------------------------------------------------------------------
# init_from: weights of an earlier phase.


def save_checkpoint(ae: DCSSDAE, path: Path) -> Path:
    torch.save({"state_dict": {f"ae.{k}": v for k, v in ae.state_dict().items()}, "dcssdae_config": ae.config()},
               path)
    return path


def test_init_from_loads_weights_and_reports_missing(tmp_path):
    source = DCSSDAE("tiny-f32c8", "tiny", corruption=FlowMatching())  # has a time MLP the EqM decoder lacks
    model = DCSSDAESystem(**TINY)
    with pytest.warns(UserWarning, match="no place in this network"):
        model.load_init_weights(str(save_checkpoint(source, tmp_path / "fm.ckpt")))
    assert any("time_mlp" in k for k in model.init_report["unexpected"])
    assert torch.equal(model.ae.encoder.project_out.weight, source.encoder.project_out.weight)


def test_init_from_is_strict_about_shapes(tmp_path):
    source = DCSSDAE("tiny-f32c8", "tiny", encoder_overrides={"latent_channels": 4})
    model = DCSSDAESystem(**TINY)
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_init_weights(str(save_checkpoint(source, tmp_path / "c4.ckpt")))


def test_init_from_a_denoiser_widens_the_output_layer_for_a_gate(tmp_path):
    """EqM `gated` initialised from a `denoiser`: the image rows of the output layer come from the file, the gate
    row keeps its zero initialisation (a nearly closed gate); the other way round is a shape mismatch."""
    torch.manual_seed(0)
    source = DCSSDAE("tiny-f32c8", "tiny")
    with torch.no_grad():
        source.decoder.out_conv.weight.normal_()
        source.decoder.out_conv.bias.normal_()
    model = DCSSDAESystem(**{**TINY, "corruption": EquilibriumMatching(parameterization="gated")})
    with pytest.warns(UserWarning, match="initialising from it anyway"):
        model.load_init_weights(str(save_checkpoint(source, tmp_path / "denoiser.ckpt")))
    out_conv = model.ae.decoder.out_conv
    assert torch.equal(out_conv.weight[:3], source.decoder.out_conv.weight)
    assert torch.equal(out_conv.bias[:3], source.decoder.out_conv.bias)
    assert not out_conv.weight[3].any() and not out_conv.bias[3].any()
    gated = DCSSDAE("tiny-f32c8", "tiny", corruption=EquilibriumMatching(parameterization="gated"))
    with pytest.raises(ValueError, match="shape mismatch"):
        DCSSDAESystem(**TINY).load_init_weights(str(save_checkpoint(gated, tmp_path / "gated.ckpt")))


def test_from_pretrained_rejects_a_non_dcssdae_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_weights(tmp_path / "other.ckpt")


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_unreadable_weight_files_give_a_short_error_naming_the_file(tmp_path):
    good = save_checkpoint(DCSSDAE("tiny-f32c8", "tiny"), tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"junk, not a checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"payload": _Payload()}, tmp_path / "pickled.ckpt")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"junk")
    cases = {"truncated.ckpt": "PytorchStreamReader failed", "junk.ckpt": "", "empty.ckpt": "EOFError",
             "pickled.ckpt": "holds Python objects other than weights", "export": "model.safetensors: SafetensorError"}
    for name, reason in cases.items():
        with pytest.raises(WeightsFileError, match=f"cannot read {tmp_path / name}.*{reason}") as info:
            DCSSDAE.from_pretrained(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and len(message) < 400, message  # not torch's page-long unpickling message
        assert "expected a Lightning .ckpt written by `dcssdae fit`" in message
        assert info.value.__cause__ is not None  # the original error, for the traceback


# ------------------------------------------------------------------------------------------------
# EMA.


def test_ema_update_rule_start_step_and_warmup():
    """Before start_step the EMA follows the weights; then decay min(d, (1+n)/(10+n))."""
    module = SimpleNamespace(ae=torch.nn.Linear(1, 1, bias=False))
    module.ae.weight.data.fill_(0.0)
    ema = EMA(decay=0.9, start_step=2)
    ema.on_fit_start(None, module)
    expected = 0.0
    for step in range(1, 6):
        module.ae.weight.data.fill_(float(step))
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step)
        if step < 2:
            expected = float(step)
        else:
            n = step - 1
            decay = min(0.9, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * step
        assert ema.ema[0].item() == pytest.approx(expected, rel=1e-6)


def test_ema_lives_in_the_checkpoint_state_dict_and_validation_uses_it(tmp_path):
    model = DCSSDAESystem(**TINY, lr=1e-2)
    ema = EMA(decay=0.5)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ema, checkpoint], num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=loader(6), val_dataloaders=loader(2))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["EMA"]["num_updates"] == 3
    live, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    name = "ae.decoder.conv_in.weight"
    assert not torch.equal(live[name], averaged[name])
    # After fit the module holds the EMA weights (what state_dict holds); the live ones are kept aside, and are what
    # the end-of-run checkpoint resumes from (not the EMA: extending a finished run must continue its trajectory).
    for (k, v), kept in zip(ema._live(model).items(), ema.ema):
        assert torch.equal(averaged["ae." + k], v) and torch.equal(live["ae." + k], kept)
    assert ckpt["dcssdae_config"]["encoder"] == "tiny-f32c8"
    # load_from_checkpoint and from_pretrained give the EMA weights
    loaded = DCSSDAESystem.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded.ae.state_dict()["decoder.conv_in.weight"], averaged[name])
    ae = DCSSDAE.from_pretrained(tmp_path / "last.ckpt")
    assert torch.equal(ae.decoder.conv_in.weight, averaged[name])


# ------------------------------------------------------------------------------------------------
# Distillation.


def _distill_from_a_teacher(tmp_path, **kwargs) -> tuple[DistillSystem, DCSSDAE]:
    """A DistillSystem as `fit` sets it up, from a saved tiny teacher, and that teacher."""
    teacher_ae = DCSSDAE("tiny-f32c8", "tiny")
    torch.nn.init.normal_(teacher_ae.decoder.out_conv.weight, std=0.1)  # a non-zero field (the init predicts 0)
    model = DistillSystem(**{**TINY, **kwargs}, trainable=["decoder.*"], init_from=str(
        save_checkpoint(teacher_ae, tmp_path / "phase3.ckpt")))
    model._trainer = SimpleNamespace(ckpt_path=None)
    model.setup("fit")
    model._trainer = None
    return model, teacher_ae


def test_distill_student_learns_teachers_n_step_sample_from_the_same_noise(tmp_path, monkeypatch):
    model, teacher_ae = _distill_from_a_teacher(tmp_path, teacher_steps=3)
    assert torch.equal(model.teacher.decoder.out_norm.weight, teacher_ae.decoder.out_norm.weight)
    from dcssdae import autoencoder

    calls, original = [], autoencoder.sample
    monkeypatch.setattr(autoencoder, "sample", lambda fn, noise, method, **kw: calls.append((fn, noise, method, kw))
                        or original(fn, noise, method, **kw))
    decoder_inputs = []
    model.ae.decoder.register_forward_pre_hook(lambda module, args: decoder_inputs.append(args[0]))
    x = RandomImages(2)[0]["image"][None].repeat(2, 1, 1, 1)
    loss = model.training_step({"image": x}, 0)
    assert set(model.last_terms) == {"distill", "stlpips"}  # its own term (weight loss_weights.distill), and LPIPS
    (fn, noise, method, settings), = calls
    assert fn == model.teacher.pred and method == "gd" and settings["steps"] == 3
    assert model.ae.sampler["method"] == "one_step"  # the student (and its exports) decode in one step
    assert model.ae.config()["sampler"]["method"] == "one_step"
    assert settings["schedule"] == "noise" and settings["step_to_data"] == model.teacher.corruption.step_to_data
    assert torch.equal(decoder_inputs[0], noise)  # the student sees the teacher's noise, once
    assert len(decoder_inputs) == 1
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ae.decoder.parameters())
    # (that the teacher and the shared encoder stay put under optimiser steps: tests/test_distill.py)


def test_distill_data_term_is_the_perceptual_distance_of_the_students_image_to_the_real_one(tmp_path):
    """The logged terms, recomputed on another path: the student's one-step decode and the teacher's N-step decode
    of the training step's noise (`DCSSDAE.decode`), scored by the ST-LPIPS network itself (not the loss's shared
    pass): `stlpips` to the teacher's sample, `data` to the real image."""
    model, _ = _distill_from_a_teacher(tmp_path, loss_weights=LossWeights(repa=0.0, data=0.7), teacher_steps=2)
    noises, teacher_sample = [], model.teacher.sample
    model.teacher.sample = lambda noise, z, sampler: noises.append(noise) or teacher_sample(noise, z, sampler)
    x = RandomImages(2)[0]["image"][None].repeat(2, 1, 1, 1)
    loss = model.training_step({"image": x}, 0)
    assert set(model.last_terms) == {"distill", "stlpips", "data"}
    (noise,) = noises
    with torch.no_grad():
        z = model.ae.encode(x)
        student = model.ae.decode(z, noise=noise)  # the student's own sampler: one step
        teacher = model.teacher.decode(z, noise=noise, steps=2)
        network = model.lpips._model.net  # the stlpips package's LPIPS module
        to_teacher, to_x = network(student, teacher).mean(), network(student, x).mean()
    assert not torch.allclose(teacher, x) and not torch.allclose(to_teacher, to_x)
    assert torch.allclose(model.last_terms["stlpips"], to_teacher, rtol=1e-4)
    assert torch.allclose(model.last_terms["data"], to_x, rtol=1e-4)
    terms = model.last_terms
    assert torch.allclose(loss, terms["distill"] + 0.5 * terms["stlpips"] + 0.7 * terms["data"])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ae.decoder.parameters())


def test_distill_refuses_a_trainable_encoder_and_a_missing_teacher():
    with pytest.raises(ValueError, match="decoder only"):
        DistillSystem(**TINY, trainable=["*"])
    with pytest.raises(ValueError, match=r"loss_weights.data .* set loss_weights.stlpips > 0"):
        DistillSystem(**{**TINY, "loss_weights": LossWeights(repa=0.0, stlpips=0.0, data=0.5)}, trainable=["decoder.*"])
    model = DistillSystem(**TINY, trainable=["decoder.*"])
    model._trainer = SimpleNamespace(ckpt_path=None)
    with pytest.raises(ValueError, match="needs a teacher"):
        model.setup("fit")


def test_validation_noise_is_the_same_every_time(tmp_path):
    model = DCSSDAESystem(**{**TINY, "loss_weights": LossWeights(stlpips=0.0, repa=0.0)})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    first = trainer.validate(model, loader(2), verbose=False)[0]
    second = trainer.validate(model, loader(2), verbose=False)[0]
    assert first["val/psnr"] == second["val/psnr"]
    assert (tmp_path / "validate_metrics.json").is_file()  # `dcssdae validate` writes its metrics


# ------------------------------------------------------------------------------------------------
# Predictions (`dcssdae predict`).


class KeyedImages(RandomImages):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "key": f"photos/img{i}"}


def test_predict_returns_reconstructions_and_writes_input_reconstruction_pngs(tmp_path):
    model = DCSSDAESystem(**{**TINY, "loss_weights": LossWeights(stlpips=0.0, repa=0.0)})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    images = DataLoader(KeyedImages(3), batch_size=2)
    written = trainer.predict(model, images)
    assert [p["key"] for p in written] == [["photos/img0", "photos/img1"], ["photos/img2"]]
    assert all("x_hat" not in p for p in written)  # dropped once written: predicting 50k images holds no images
    pngs = sorted((tmp_path / "reconstructions").glob("*.png"))
    assert [p.name for p in pngs] == ["photos_img0.png", "photos_img1.png", "photos_img2.png"]
    assert written[0]["png"] == [str(pngs[0]), str(pngs[1])]

    model.predict_dir = None  # the Python API: the reconstructions themselves, as validation makes them
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path / "python_api")
    (first, second) = trainer.predict(model, images)
    assert not (tmp_path / "python_api").exists()  # nothing written
    assert first["x_hat"].shape == (2, 3, 64, 64) and second["x_hat"].shape == (1, 3, 64, 64)
    assert first["x_hat"].abs().max() <= 1 and first["nfe"].tolist() == [1, 1]
    assert first["psnr"].shape == (2,) and torch.isfinite(first["psnr"]).all()
    from dcssdae.metrics import quantize_uint8

    png = torch.from_numpy(np.asarray(Image.open(pngs[0]))).permute(2, 0, 1)  # (3, 64, 128): input | reconstruction
    assert torch.equal(png[:, :, :64], quantize_uint8(KeyedImages(3)[0]["image"]))
    assert torch.equal(png[:, :, 64:], quantize_uint8(first["x_hat"][0]))


def test_weights_of_another_corruption_warn_for_init_from_and_stop_a_resume(tmp_path):
    """A checkpoint saved before the denoiser parameterisation (its config has no `parameterization`) holds a field
    network: initialising a denoiser run from it warns, resuming from it or using it as a teacher is refused."""
    source = DCSSDAE("tiny-f32c8", "tiny")
    path = save_checkpoint(source, tmp_path / "old.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["dcssdae_config"]["corruption"]["init_args"]["parameterization"]  # written before the option
    torch.save(checkpoint, path)
    model = DCSSDAESystem(**TINY)
    with pytest.warns(UserWarning, match="'parameterization': 'field'"):
        model.load_init_weights(str(path))
    with pytest.raises(ValueError, match="set model.corruption to match"):
        model.on_load_checkpoint(torch.load(path, weights_only=True))


def test_extra_step_counts_are_scored_beside_the_model_from_the_same_noise(tmp_path):
    tiny = {**TINY, "val_steps": 2, "loss_weights": LossWeights(stlpips=0.0, repa=0.0)}
    model = DCSSDAESystem(**tiny, val_extra_steps=[1])
    torch.nn.init.normal_(model.ae.decoder.out_conv.weight, std=0.1)  # zero at init: every step count would agree
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    result = trainer.validate(model, loader(2), verbose=False)[0]
    assert result["val/nfe"] == 2 and result["val_1step/nfe"] == 1
    assert result["val_1step/psnr"] != pytest.approx(result["val/psnr"], abs=1e-6)
    report = yaml.safe_load((tmp_path / "validate_metrics.json").read_text())  # JSON is YAML
    assert report["1 step"]["nfe"] == 1 and report["1 step"]["psnr"] == pytest.approx(result["val_1step/psnr"])
    # the same images as a model validated with one step itself, and no checkpoint keys of its own
    plain = DCSSDAESystem(**{**tiny, "val_steps": 1})
    plain.load_state_dict(model.state_dict())
    alone = trainer.validate(plain, loader(2), verbose=False)[0]
    assert alone["val/psnr"] == pytest.approx(result["val_1step/psnr"])
    with pytest.raises(ValueError, match="val_extra_steps"):
        DCSSDAESystem(**tiny, val_extra_steps=[0])


def test_training_level_settings_do_not_make_another_network(tmp_path):
    """EqM noise_power (and FM's logit-normal parameters) only choose the training levels: weights trained with
    another value initialise, resume and teach without complaint; the saved config keeps the value."""
    source = DCSSDAE("tiny-f32c8", "tiny", corruption=EquilibriumMatching(noise_power=2.0))
    path = save_checkpoint(source, tmp_path / "np2.ckpt")
    assert torch.load(path, weights_only=True)["dcssdae_config"]["corruption"]["init_args"]["noise_power"] == 2.0
    model = DCSSDAESystem(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.check_corruption(source.config()["corruption"], str(path))  # strict: would raise if it differed
    with pytest.raises(ValueError, match="set model.corruption to match"):
        model.check_corruption(DCSSDAE("tiny-f32c8", "tiny", corruption=EquilibriumMatching(
            decay="truncated")).config()["corruption"], str(path))
    # --ckpt_path with another noise_power on the command line is no architecture conflict
    from dcssdae.autoencoder import corruption_config
    from dcssdae.cli import reconcile_with_checkpoint

    given = {"corruption": corruption_config(EquilibriumMatching(noise_power=3.0))}
    _, settings, _ = reconcile_with_checkpoint("dcssdae.system.DCSSDAESystem", given, {
        "corruption": source.config()["corruption"]}, str(path), typed={"init_args": given})
    assert settings["corruption"]["init_args"]["noise_power"] == 3.0
    truncated = {"corruption": corruption_config(EquilibriumMatching(decay="truncated"))}
    with pytest.raises(ValueError, match="the network must be the checkpoint's"):
        reconcile_with_checkpoint("dcssdae.system.DCSSDAESystem", truncated, {
            "corruption": source.config()["corruption"]}, str(path), typed={"init_args": truncated})
    fm = DCSSDAESystem(**{**TINY, "corruption": FlowMatching()})
    fm.check_corruption(DCSSDAE("tiny-f32c8", "tiny", corruption=FlowMatching(logit_mean=0.5)).config()["corruption"],
                        str(path))


def test_a_distillation_student_scores_only_one_step_beside_itself():
    with pytest.raises(ValueError, match="val_extra_steps may hold only 1"):
        DistillSystem(**{**TINY, "loss_weights": LossWeights(distill=1.0, stlpips=0.0, repa=0.0, kl=0.0)},
                      trainable=["decoder.*"], val_extra_steps=[4])
