"""Checkpoints on a shared cluster: atomic writes (kill -9 mid-write keeps the previous file), weights-only
loading (a pickled payload is refused), no NaN checkpoints, and a checkpoint on SIGTERM / Ctrl+C that resumes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dcssdae.checkpointing import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    NonFiniteCheckpointError,
    atomic_save,
    load_checkpoint,
    nonfinite_tensors,
    step_seed,
)

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, code: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path)


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> list[str]:
    """Read the child's output until a line starts with `marker`; fail (with the output) if it never does."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(marker):
            return lines
    proc.kill()
    pytest.fail(f"child never printed {marker!r}:\n" + "".join(lines))


# ------------------------------------------------------------------------------------------------
# Atomic writes: kill -9 during the write of checkpoint 2 leaves checkpoint 1 loadable.

SLOW_WRITER = """
    import io, sys, threading, time, torch
    from dcssdae.checkpointing import AtomicCheckpointIO

    atomic, in_place = sys.argv[1], sys.argv[2]
    for path in (atomic, in_place):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)

    started = threading.Barrier(3)

    def slow_save(obj, f):  # torch.save, written in small chunks with pauses (a large checkpoint on slow disk)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        for i in range(0, len(data), 512):
            f.write(data[i : i + 512])
            f.flush()
            if i == 1024:
                started.wait()
            time.sleep(0.05)

    def write_in_place(checkpoint, path):  # what a plain torch.save(checkpoint, path) does
        with open(path, "wb") as f:
            torch.save(checkpoint, f)

    real_save, torch.save = torch.save, slow_save
    checkpoint = {"state_dict": {"w": torch.full((1000,), 2.0)}, "global_step": 2}
    for write, path in ((AtomicCheckpointIO().save_checkpoint, atomic), (write_in_place, in_place)):
        threading.Thread(target=write, args=(checkpoint, path)).start()
    started.wait()
    print("WRITING", flush=True)
"""


def test_kill9_during_write_keeps_previous_checkpoint(tmp_path):
    atomic, in_place = tmp_path / "ckpt" / "last.ckpt", tmp_path / "control.ckpt"
    proc = run_script(tmp_path, SLOW_WRITER, str(atomic), str(in_place))
    wait_for(proc, "WRITING")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with pytest.raises(CheckpointLoadError, match="cannot be read"):  # the control: written in place, truncated
        load_checkpoint(in_place)
    checkpoint = load_checkpoint(atomic)  # weights_only=True
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(1000))
    leftovers = list(atomic.parent.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1  # the partial write, under a temporary name
    atomic_save({"global_step": 3}, atomic)  # the next write removes what the killed writer left
    assert not list(atomic.parent.glob(".*.tmp")) and load_checkpoint(atomic)["global_step"] == 3


def test_atomic_save_keeps_permissions_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.ckpt"
    atomic_save({"x": torch.zeros(2)}, path)
    atomic_save({"x": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.ckpt"]


def test_written_files_get_the_umask_permissions_not_owner_only(tmp_path):
    # tempfile.mkstemp / mkdtemp create 0600 / 0700: checkpoints, metric JSON and exports must be shareable
    from dcssdae.atomic_files import write_json
    from dcssdae.autoencoder import DCSSDAE
    from dcssdae.export import write_export

    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(2)}, tmp_path / "run" / "last.ckpt")
        write_json({"psnr": 30.0}, tmp_path / "run" / "validate_metrics.json")
        export = write_export(DCSSDAE("tiny-f32c8", "tiny"), tmp_path / "export")
    finally:
        os.umask(old)
    for path in (tmp_path / "run" / "last.ckpt", tmp_path / "run" / "validate_metrics.json", *export.iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert export.stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------------------
# Safe loading: a checkpoint carrying a pickled payload is refused, and the payload never runs.


class Payload:
    """Unpickling this creates the file `marker`: stands for arbitrary code run by pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    from dcssdae.autoencoder import load_weights
    from dcssdae.export import read_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"ae.w": torch.zeros(1)}, "dcssdae_config": {}, "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointLoadError, match="holds Python objects other than weights"):
        load_checkpoint(path)
    with pytest.raises(CheckpointLoadError, match="refusing to unpickle"):
        AtomicCheckpointIO().load_checkpoint(path)  # what `dcssdae fit --ckpt_path` goes through
    for loader in (load_weights, read_checkpoint):  # init_from / from_pretrained, and `dcssdae export`
        with pytest.raises(Exception, match="(?i)weights.only"):
            loader(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: plain unpickling runs the payload
    assert marker.exists()


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointLoadError, match="junk.ckpt cannot be read .not a torch checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")


# ------------------------------------------------------------------------------------------------
# NaN never reaches a checkpoint.


def test_nonfinite_checkpoint_is_refused_and_previous_kept(tmp_path):
    path, io = tmp_path / "last.ckpt", AtomicCheckpointIO()
    good = {"state_dict": {"ae.w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}
    io.save_checkpoint(good, path)
    bad = {"state_dict": {"ae.w": torch.tensor([1.0, float("nan"), 0.0]), "ae.n": torch.tensor([3])},
           "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}]}
    assert nonfinite_tensors(bad) == ["optimizer_states/0/state/0/exp_avg", "state_dict/ae.w"]
    with pytest.raises(NonFiniteCheckpointError, match=r"2 tensor\(s\) hold NaN or Inf .*state_dict/ae.w"):
        io.save_checkpoint(bad, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["ae.w"], torch.ones(3))
    AtomicCheckpointIO(check_finite=False).save_checkpoint(bad, tmp_path / "debug.ckpt")  # opt-out for debugging


def test_step_seed_is_a_pure_function():
    seeds = {step_seed(0, r, e, b) for r in range(2) for e in range(3) for b in range(50)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(7, 1, 2, 3) == step_seed(7, 1, 2, 3) != step_seed(8, 1, 2, 3)


# ------------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM / a first Ctrl+C finish the step, write last.ckpt and exit; the run resumes from it.

TRAIN = """
    import sys, time, torch, lightning as L
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.callbacks import ModelCheckpoint
    from dcssdae.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, StepSeed

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            time.sleep(0.1)  # a slow step: the signal arrives mid-run
            print(f"STEP {self.global_step}", flush=True)
            return (self.net(batch[0]) - torch.randn(4)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    max_steps, ckpt_path = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=".", plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath="ckpts", every_n_train_steps=1000, save_last=True),
                                   PreemptionCheckpoint(), StepSeed()])
    module = Tiny()
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2), ckpt_path=ckpt_path)
    print(f"DONE {trainer.global_step}", flush=True)
"""


def stop_with(tmp_path: Path, signum: int) -> tuple[int, str]:
    """Start a (slow) training run, send `signum` after step 3; return the step saved in last.ckpt and the output."""
    proc = run_script(tmp_path, TRAIN, "1000")
    wait_for(proc, "STEP 3")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert "DONE" not in out, out  # it stopped early ...
    path = tmp_path / "ckpts" / "last.ckpt"
    assert path.is_file(), out  # ... after writing the checkpoint, atomically and weights-only loadable
    checkpoint = load_checkpoint(path)
    assert checkpoint["callbacks"]["StepSeed"] == {"seed": 0} and "Pre-empted at step" in out
    assert 4 <= checkpoint["global_step"] <= 6  # the step in flight was finished, not abandoned
    return checkpoint["global_step"], out


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    stopped_at, _ = stop_with(tmp_path, signal.SIGTERM)
    resumed = run_script(tmp_path, TRAIN, str(stopped_at + 3), "last")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    steps = [int(line.split()[1]) for line in out.splitlines() if line.startswith("STEP")]
    assert steps == list(range(stopped_at, stopped_at + 3)) and f"DONE {stopped_at + 3}" in out, out


# A run killed (SIGKILL: a node lost) in the middle of writing last.ckpt resumes from the last complete one.

KILLED_WHILE_SAVING = """
    import io, sys, time, torch, lightning as L
    from torch.utils.data import DataLoader, TensorDataset
    from dcssdae.checkpointing import AtomicCheckpointIO, RunCheckpoint, StepSeed

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 64)

        def training_step(self, batch, batch_idx):
            print(f"STEP {self.global_step}", flush=True)
            return (self.net(batch[0]) - 1).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    max_steps, ckpt_path, slow = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "slow"
    real_save, saves = torch.save, []

    def slow_save(obj, f):  # the second checkpoint is written slowly (a large file on a slow disk)
        saves.append(obj.get("global_step") if isinstance(obj, dict) else None)
        if len(saves) < 2:
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        for i in range(0, len(data), 1024):
            f.write(data[i : i + 1024])
            f.flush()
            if i == 2048:
                print(f"WRITING step {obj['global_step']}", flush=True)
            time.sleep(0.05)

    if slow:
        torch.save = slow_save
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=".", plugins=[AtomicCheckpointIO()],
                        callbacks=[RunCheckpoint(dirpath="ckpts", every_n_train_steps=2, save_top_k=0, save_last=True,
                                                 enable_version_counter=False), StepSeed()])
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(64, 64)), batch_size=2),
                ckpt_path=None if ckpt_path == "none" else ckpt_path)
    print(f"DONE {trainer.global_step}", flush=True)
"""


def test_a_run_killed_while_writing_its_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    """last.ckpt is written at steps 2, 4, ...; SIGKILL arrives while step 4's is being written: last.ckpt still
    holds step 2 (the partial file has a temporary name), and `--ckpt_path last` resumes from it to the end."""
    proc = run_script(tmp_path, KILLED_WHILE_SAVING, "1000", "none", "slow")
    wait_for(proc, "WRITING step 4", timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = tmp_path / "ckpts" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2  # complete and weights-only loadable
    assert len(list(last.parent.glob(".last.ckpt.*.tmp"))) == 1  # the interrupted write
    resumed = run_script(tmp_path, KILLED_WHILE_SAVING, "6", "last", "fast")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    steps = [int(line.split()[1]) for line in out.splitlines() if line.startswith("STEP")]
    assert steps == [2, 3, 4, 5] and "DONE 6" in out, out
    assert load_checkpoint(last)["global_step"] == 6 and not list(last.parent.glob(".*.tmp"))


def test_first_ctrl_c_saves_a_checkpoint(tmp_path):
    _, out = stop_with(tmp_path, signal.SIGINT)
    assert "Interrupted: finishing the current step" in out


def test_ckpt_path_last_names_the_same_file_for_the_settings_the_log_folder_and_the_trainer(tmp_path):
    """`--ckpt_path last`: the settings restored (cli.last_checkpoint), the log folder continued
    (callbacks.resume_log_folder) and the trainer's resume all take Lightning's choice, the newest last*.ckpt of the
    checkpoint folders."""
    import types

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from dcssdae.callbacks import resume_log_folder
    from dcssdae.checkpointing import last_checkpoint_in
    from dcssdae.cli import last_checkpoint

    folder, other = tmp_path / "checkpoints", tmp_path / "other"
    logs = str(tmp_path / "logs" / "lightning_logs")
    files = [(folder, "last-v1.ckpt", 3), (folder, "last.ckpt", 1), (folder, "epoch=0.ckpt", 0), (other, "last.ckpt", 5)]
    for where, name, version in files:
        where.mkdir(exist_ok=True)
        torch.save({"log_folders": [{"logger": "TensorBoardLogger", "root_dir": logs, "version": version}]},
                   where / name)
        os.utime(where / name, (1000 + version, 1000 + version))  # newest: other/last.ckpt, then last-v1.ckpt
    newest_here = str(folder / "last-v1.ckpt")
    assert last_checkpoint_in(folder) == newest_here
    assert last_checkpoint({"checkpoint": {"dirpath": str(folder)}}) == newest_here
    assert last_checkpoint({"trainer": {"default_root_dir": str(tmp_path)}}) == newest_here  # <root>/checkpoints
    assert last_checkpoint_in(tmp_path / "none") is None and last_checkpoint_in("s3://bucket/run") is None
    callbacks = [ModelCheckpoint(dirpath=str(folder)), ModelCheckpoint(dirpath=str(other))]
    trainer = types.SimpleNamespace(checkpoint_callbacks=callbacks, loggers=[TensorBoardLogger(str(tmp_path / "logs"))])
    lightnings = max((p for c in callbacks for p in c._find_last_checkpoints(trainer)), key=os.path.getmtime)
    assert last_checkpoint_in(folder, other) == lightnings == str(other / "last.ckpt")
    resume_log_folder(trainer, "last")
    assert trainer.loggers[0].version == 5
