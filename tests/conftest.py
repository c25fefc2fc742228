import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Command lines are checked by the full LightningCLI parser; tests/test_parser_cache.py turns the cached check on.
os.environ.setdefault("DCSSDAE_PARSER_CACHE", "0")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ------------------------------------------------------------------------------------------------
# The `dcssdae` command end to end (tests/test_cli.py, test_bad_input.py, test_resume.py).


class TinyCLI:
    """`dcssdae COMMAND --config CONFIG --config tests/configs/cpu_tiny.yaml` in a working directory that holds the
    default photo shards; each run NAME writes its logs to runs/NAME and (by default) its checkpoints to
    runs/NAME/checkpoints."""

    configs = ROOT / "configs"
    tiny = ROOT / "tests" / "configs" / "cpu_tiny.yaml"

    def __init__(self, work: Path):
        self.work = work

    def args(self, command: str, name: str, *extra: str, config: str | Path = "quickstart.yaml") -> list[str]:
        """The command line (without `dcssdae`); `config` is a shipped config's name or a path."""
        return [command, "--config", str(self.configs / config), "--config", str(self.tiny),
                "--trainer.default_root_dir", f"runs/{name}", *extra]

    def __call__(self, command: str, name: str, *extra: str, config: str | Path = "quickstart.yaml") -> int:
        """Run it in this process; the exit code (0: success, 1: a reported error, 143: pre-empted)."""
        from dcssdae.cli import main

        return main(self.args(command, name, *extra, config=config))

    def subprocess(self, command: str, name: str, *extra: str, config: str | Path = "quickstart.yaml",
                   env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run it in a new Python process (`python -m dcssdae.cli ...`), e.g. for DDP; stdout and stderr captured."""
        command_line = [sys.executable, "-m", "dcssdae.cli", *self.args(command, name, *extra, config=config)]
        return subprocess.run(command_line, capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=self.work, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                                                  **(env or {})})

    def last_ckpt(self, name: str) -> Path:
        return self.work / "runs" / name / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def default_photo_shards(tmp_path_factory) -> Path:
    """The default photo shards (train and dev), written once per pytest run; copy them, never write into them."""
    from dcssdae.photos import ensure_default_photos

    root = tmp_path_factory.mktemp("default_photos") / "photos"
    ensure_default_photos(root)
    return root


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory, request, default_photo_shards) -> TinyCLI:
    """A `TinyCLI` whose working directory (the current one during the module's tests) and default photo shards (a
    copy of the shards `default_photo_shards` writes once per pytest run) are made once per test module."""
    work = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    shutil.copytree(default_photo_shards, work / "data" / "photos", ignore=shutil.ignore_patterns(".lock"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCSSDAE_DATA", str(work / "data"))
        mp.chdir(work)
        from dcssdae.photos import ensure_default_photos

        ensure_default_photos()  # the copy is complete: nothing is written
        yield TinyCLI(work)
