"""Multi-node launches: the quick-start as two nodes of one process each under torchrun (c10d rendezvous on this
machine, gloo), fit then resume; and the SLURM batch script scripts/slurm/train.sbatch: the environment its srun
tasks get is read by Lightning's SLURMEnvironment as the right ranks and world size, and near the time limit it
has the tasks save before it requeues the job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


class RecordTopology(Callback):
    """Writes <default_root_dir>/topology_rank<R>.json: what the trainer took the cluster to be, the step the run
    started from and ended at, and a checksum of the weights at the end."""

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        env = trainer._accelerator_connector.cluster_environment
        record = {"global_rank": trainer.global_rank, "world_size": trainer.world_size, "node_rank": trainer.node_rank,
                  "local_rank": trainer.local_rank, "environment": type(env).__name__, "start": self.start,
                  "end": trainer.global_step,
                  "checksum": sum(p.double().sum().item() for p in pl_module.ae.parameters())}
        path = Path(trainer.default_root_dir) / f"topology_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tiny_cli, name: str, *extra: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --nproc-per-node 1` twice on this machine (two "nodes"), c10d rendezvous, each running
    the quick-start with the tiny test overlay as DDP over gloo; returns both agents' results."""
    port, run_id = _free_port(), f"{name}-{os.getpid()}"
    record = {"trainer": {"callbacks": [{"class_path": "test_multinode.RecordTopology"}]}}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
               "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "dcssdae.cli",
               *tiny_cli.args("fit", name, "--trainer.num_nodes", "2", "--trainer.devices", "1",
                              "--trainer.strategy", "ddp", "--data.train_epoch_size", "8",
                              "--trainer.limit_val_batches", "0", "--config", json.dumps(record), *extra)]
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, cwd=tiny_cli.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    results = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(command, node.returncode, out, ""))
    return results


@pytest.mark.slow
def test_two_nodes_under_torchrun_fit_then_resume(tiny_cli):
    """~1-2 min on 2 cores: two torchrun agents (one process each) rendezvous, train 2 steps as one DDP job of world
    size 2, then resume from last.ckpt on two nodes again to step 4."""
    fit = _two_nodes(tiny_cli, "two_nodes")
    for result in fit:
        assert result.returncode == 0, result.stdout[-4000:]
    run = tiny_cli.work / "runs" / "two_nodes"

    def records() -> list[dict]:
        return [json.loads((run / f"topology_rank{r}.json").read_text()) for r in (0, 1)]

    first = records()
    assert [(r["global_rank"], r["world_size"], r["local_rank"]) for r in first] == [(0, 2, 0), (1, 2, 0)]
    assert sorted(r["node_rank"] for r in first) == [0, 1]  # two nodes, not two processes of one
    assert {r["environment"] for r in first} == {"TorchElasticEnvironment"}
    assert [(r["start"], r["end"]) for r in first] == [(0, 2), (0, 2)]
    assert first[0]["checksum"] == first[1]["checksum"]  # DDP kept the replicas identical
    assert torch.load(tiny_cli.last_ckpt("two_nodes"), weights_only=True)["global_step"] == 2

    resumed = _two_nodes(tiny_cli, "two_nodes", "--trainer.max_steps", "4", "--ckpt_path", "last")
    for result in resumed:
        assert result.returncode == 0, result.stdout[-4000:]
    second = records()
    assert [(r["start"], r["end"], r["world_size"]) for r in second] == [(2, 4, 2), (2, 4, 2)]
    assert second[0]["checksum"] == second[1]["checksum"] != first[0]["checksum"]
    assert torch.load(tiny_cli.last_ckpt("two_nodes"), weights_only=True)["global_step"] == 4


# ------------------------------------------------------------------------------------------------
# SLURM


def _directives() -> dict[str, str]:
    found = re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", SBATCH.read_text(), flags=re.MULTILINE)
    return {key: value for key, value in found}


def _fake_tools(folder: Path, srun_body: str) -> dict[str, str]:
    """`srun` and `scontrol` stand-ins in `folder`, first on PATH: srun records its arguments (NUL-separated) and
    runs `srun_body`; scontrol appends its arguments to the log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "srun").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > "$FAKE_ARGS"\n{srun_body}\n')
    (folder / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "FAKE_ARGS": str(folder / "args"),
            "FAKE_LOG": str(folder / "log")}


def _job_env(nodes: int, tasks: int) -> dict[str, str]:
    """What sbatch gives the batch shell for the script's directives."""
    return {"SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": _directives()["job-name"], "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NTASKS": str(nodes * tasks),
            "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NODELIST": "gpu[017-018]"}


def test_slurm_script_tasks_get_their_ranks_through_lightnings_slurm_environment(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from dcssdae.cli import run_lightning_cli

    directives = _directives()
    nodes, tasks = int(directives["nodes"]), int(directives["ntasks-per-node"])
    assert tasks == int(directives["gpus-per-node"]) == 8  # one process per GPU
    assert "requeue" in directives and re.fullmatch(r"B:USR1@\d+", directives["signal"])
    # the batch shell with a recording srun
    env = {**os.environ, **_job_env(nodes, tasks), **_fake_tools(tmp_path / "bin", "exit 0")}
    result = subprocess.run(["bash", str(SBATCH), "configs/phase1.yaml", "--data.num_workers", "4"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    argv = (tmp_path / "bin" / "args").read_text().split("\0")[:-1]
    command = argv[next(i for i, a in enumerate(argv) if not a.startswith("-")):]  # after srun's own options
    assert command[:4] == ["dcssdae", "fit", "--config", "configs/phase1.yaml"]
    assert command[4:] == ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(tasks),
                           "--ckpt_path", "last", "--data.num_workers", "4"]

    # each task: the variables srun sets, read by Lightning's SLURMEnvironment through our CLI
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for key, value in _job_env(nodes, tasks).items():
        monkeypatch.setenv(key, value)
    # the config by absolute path (the module's tiny_cli fixture may have moved the working directory); no GPU here,
    # no ckpt_path
    arguments = [command[2], str(ROOT / command[3]), "--config", str(ROOT / "tests" / "configs" / "cpu_tiny.yaml"),
                 *command[4:8], "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    # a Trainer of global rank r sets rank_zero_only.rank = r for the process: restored after the test, or every
    # later test of this process would lose its rank-zero warnings
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for rank in (0, 9, nodes * tasks - 1):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_LOCALID", str(rank % tasks))
        monkeypatch.setenv("SLURM_NODEID", str(rank // tasks))
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        monkeypatch.delenv("MASTER_PORT", raising=False)
        trainer = run_lightning_cli(arguments, run=False).trainer
        environment = trainer._accelerator_connector.cluster_environment
        assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        assert (trainer.world_size, trainer.num_nodes, trainer.num_devices) == (nodes * tasks, nodes, tasks)
        assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (rank, rank % tasks, rank // tasks)
        assert environment.main_address == "gpu017" and environment.main_port == 15000 + 3456  # job id's last 4


def test_slurm_script_near_the_time_limit_saves_then_requeues(tmp_path):
    """SIGUSR1 to the batch shell: the tasks get SIGTERM through srun (they save last.ckpt and exit 143), and only
    then is the job requeued."""
    srun = ('echo started >> "$FAKE_LOG"\ntrap \'echo "TERM: saving" >> "$FAKE_LOG"; sleep 0.3; '
            'echo saved >> "$FAKE_LOG"; exit 143\' TERM\nfor i in $(seq 600); do sleep 0.1; done\nexit 0')
    tools = _fake_tools(tmp_path / "bin", srun)
    env = {**os.environ, **_job_env(2, 8), **tools}
    shell = subprocess.Popen(["bash", str(SBATCH), "configs/phase1.yaml"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log = Path(tools["FAKE_LOG"])
    deadline = time.monotonic() + 30
    while not (log.is_file() and "started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=30)
    assert log.read_text().splitlines() == ["started", "TERM: saving", "saved", "scontrol requeue 123456"], out
    assert shell.returncode == 143, out
