"""The README's set-up commands on a fresh clone: `make quickstart` and `make test` each create the environment
first when it is missing (then train and validate the quick-start, or run the suite); `make install` alone stays;
CI runs the README's test command. Checked with `make -n` (what would run) in a copy of the Makefile."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def would_run(folder: Path, *targets: str) -> list[str]:
    (folder / "Makefile").write_text((ROOT / "Makefile").read_text())
    result = subprocess.run(["make", "-n", *targets], cwd=folder, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if not line.startswith(("echo", "make["))]


INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q --no-cache-dir -e '.[dev]'"


def test_quickstart_and_test_create_the_environment_when_it_is_missing(tmp_path):
    assert would_run(tmp_path, "test") == [INSTALL, "OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m \"not slow\""]
    quickstart = would_run(tmp_path, "quickstart")
    assert quickstart[0] == INSTALL
    assert quickstart[1].startswith(".venv/bin/python -m dcssdae.cli fit --config configs/quickstart.yaml")
    assert quickstart[2].startswith(".venv/bin/python -m dcssdae.cli validate --config configs/quickstart.yaml")
    assert "--ckpt_path runs/quickstart/checkpoints/last.ckpt" in " ".join(quickstart[2:])
    assert would_run(tmp_path, "install") == [INSTALL]


def test_an_existing_environment_is_used_as_it_is(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "dcssdae").touch()
    assert would_run(tmp_path, "test") == ["OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m \"not slow\""]
    assert INSTALL not in would_run(tmp_path, "quickstart")
    # a Python given on the command line is not replaced by a new environment
    assert would_run(tmp_path / ".venv", "test", "PY=python") == ["OMP_NUM_THREADS=1 python -m pytest -q -m \"not slow\""]


def test_ci_runs_the_readme_test_command():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test" and not any(line.startswith("make install") for line in commands)
