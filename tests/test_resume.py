"""Exact resume: a run stopped mid-epoch (SIGTERM) and resumed with `--ckpt_path last` ends with the same weights,
EMA, optimiser state and data position as a run that never stopped; so does a finished run extended to more steps.
SIGTERM to the whole process group (data workers included) still saves. Also the data stream alone: resuming at any
batch of an epoch, with several persistent workers, gives exactly the remaining batches."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from dcssdae.data import PositionedLoader, TrainShards
from dcssdae.shards import Item, write_shards


def jpeg(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def test_train_stream_resumes_at_any_batch(tmp_path):
    items = [Item(f"img{i:03d}", -1, f"mem{i}", jpeg(40 + i % 3, 36, i)) for i in range(24)]
    urls = str(tmp_path / write_shards(items, tmp_path, "train", 6, progress=False)["pattern"])
    position = [None]
    stream = TrainShards(urls, 32, 1.5, batch_size=2, batches_per_rank=8, shuffle_buffer=4, seed=0, rank=0)
    loader = PositionedLoader(stream, lambda: position[0], num_workers=2, persistent_workers=True)
    position[0] = (1, 0)
    epoch1 = [b for b in loader]
    assert [b["index"] for b in epoch1] == list(range(8)) and {b["epoch"] for b in epoch1} == {1}
    for first in (1, 3, 4, 7, 8):  # both workers' streams, shifted; and the end of the epoch
        position[0] = (1, first)
        resumed = list(loader)
        assert [b["key"] for b in resumed] == [b["key"] for b in epoch1[first:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, epoch1[first:]))
    position[0] = (2, 0)
    assert [b["key"] for b in loader] != [b["key"] for b in epoch1]  # another epoch, other draws


# ------------------------------------------------------------------------------------------------
# End to end through `dcssdae fit`: tiny model, default photos, 2 data workers, validation (EMA swap) mid-run.


class SigtermAt(Callback):
    """Sends this process SIGTERM, as a cluster's pre-emption would: after optimiser step `step`, or (`in_validation`)
    during the validation that follows it."""

    def __init__(self, step: int, in_validation: bool = False):
        self.step, self.in_validation = step, in_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.in_validation:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and self.in_validation and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordLive(Callback):
    """Writes <root>/started.json (the step the run started at) and, after the last optimiser step, <root>/live.pt:
    the module's live autoencoder weights, as they are before any end-of-run hook touches them."""

    def on_train_start(self, trainer, pl_module):
        Path(trainer.default_root_dir, "started.json").write_text(json.dumps(trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"STEP {trainer.global_step} epoch {trainer.current_epoch} batch {batch_idx} "
              f"at {trainer.datamodule.train_position} {batch['key']}", flush=True)
        if trainer.global_step == trainer.max_steps:
            live = {k: v.detach().clone() for k, v in pl_module.ae.state_dict().items()}
            torch.save(live, Path(trainer.default_root_dir, "live.pt"))


RECORD = ("--config", json.dumps({"trainer": {"callbacks": [{"class_path": f"{__name__}.RecordLive"}]}}))


@pytest.fixture(scope="module")
def fit(tiny_cli):
    """`fit(NAME, MAX_STEPS, *EXTRA)` -> exit code: 4 batches per epoch, so 6 steps cross an epoch boundary; validation
    every 2 batches swaps the EMA in and out."""
    return lambda name, max_steps, *extra: tiny_cli(
        "fit", name, "--trainer.max_steps", str(max_steps), "--data.train_epoch_size", "8", "--data.num_workers", "2",
        "--model.init_args.warmup_steps", "2", "--model.init_args.lr", "1e-3", *extra)


def final_state(name: str) -> dict:
    return torch.load(f"runs/{name}/checkpoints/last.ckpt", weights_only=True, map_location="cpu")


def assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def straight(fit):
    """The uninterrupted run: 6 steps."""
    assert fit("straight", 6, *RECORD) == 0
    return final_state("straight")


@pytest.mark.parametrize("step, in_validation", [(3, False), (2, True)])
def test_sigterm_then_resume_matches_an_uninterrupted_run(fit, straight, step, in_validation):
    # (3, False): mid-epoch 0 (batch 3 of 4), after a validation at step 2. (2, True): during that validation,
    # while the EMA weights are swapped into the model.
    name = f"stopped_{step}_{in_validation}"
    signal_at = {"class_path": f"{__name__}.SigtermAt", "init_args": {"step": step, "in_validation": in_validation}}
    code = fit(name, 1000, "--config", json.dumps({"trainer": {"callbacks": [signal_at]}}))
    assert code == 143  # pre-empted (128 + SIGTERM), after PreemptionCheckpoint wrote last.ckpt
    stopped = final_state(name)
    assert stopped["global_step"] == step and stopped["ImageNetDataModule"]["train_position"] == [0, step]

    assert fit(name, 6, "--ckpt_path", "last") == 0
    resumed = final_state(name)
    assert straight["global_step"] == resumed["global_step"] == 6
    assert straight["ImageNetDataModule"] == resumed["ImageNetDataModule"]  # data position (epoch 1, batch 2)
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):  # EMA, live weights,
        assert_same(straight[key], resumed[key], key)  # AdamW moments and step counts, LR schedule
    for key in ("EMA", "NonFiniteGuard", "StepSeed"):  # EMA update count, skipped steps, seed
        assert_same(straight["callbacks"][key], resumed["callbacks"][key], key)


def ae_entries(state: dict, prefix: str = "ae.") -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("first", [3, 4])  # mid-epoch 0 (batch 3 of 4); the end of epoch 0
def test_extending_a_finished_run_matches_an_uninterrupted_run(fit, straight, first):
    name = f"extended_{first}"
    assert fit(name, first, *RECORD) == 0
    ended = final_state(name)
    assert ended["global_step"] == first and ended["ImageNetDataModule"]["train_position"] == [0, first]
    # the end-of-run checkpoint resumes from the live weights (the EMA ones are its state_dict)
    assert_same(torch.load(f"runs/{name}/live.pt", weights_only=True), ae_entries(ended["current_model_state"]))

    assert fit(name, 6, "--ckpt_path", "last", *RECORD) == 0
    assert json.loads(Path(f"runs/{name}/started.json").read_text()) == first  # it did resume
    resumed = final_state(name)
    straight_live = torch.load("runs/straight/live.pt", weights_only=True)
    assert_same(straight_live, torch.load(f"runs/{name}/live.pt", weights_only=True), "live")  # true live weights
    assert_same(straight_live, ae_entries(resumed["current_model_state"]), "current_model_state")
    assert straight["ImageNetDataModule"] == resumed["ImageNetDataModule"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):  # the EMA, AdamW moments, LR schedule
        assert_same(straight[key], resumed[key], key)
    for key in ("EMA", "StepSeed"):
        assert_same(straight["callbacks"][key], resumed["callbacks"][key], key)


def test_sigterm_to_the_process_group_with_data_workers_saves_and_exits_143(tiny_cli):
    # As `timeout`, a container runtime or a scheduler stops a job: SIGTERM to every process of the group, the two
    # data-loader workers included (they may die first).
    args = tiny_cli.args("fit", "group_sigterm", "--trainer.max_steps", "1000", "--data.train_epoch_size", "8",
                         "--data.num_workers", "2", *RECORD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "dcssdae.cli", *args], cwd=tiny_cli.work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline and not any(line.startswith("STEP 3") for line in lines):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    os.killpg(proc.pid, signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-4000:]
    checkpoint = torch.load(tiny_cli.last_ckpt("group_sigterm"), weights_only=True)
    assert checkpoint["global_step"] >= 3 and "Pre-empted at step" in out
