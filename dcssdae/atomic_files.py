"""Files written so that nothing already there is lost: JSON files and folders written atomically (a temporary beside
the target, then one rename), with the permissions `open()` / `mkdir()` would have given them under the umask."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def finite_or_none(tree: Any) -> Any:
    """A JSON tree (dicts, lists, tuples) with every nan / inf float replaced by None (JSON null)."""
    if isinstance(tree, dict):
        return {str(k): finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def umask_mode(mode: int = 0o666) -> int:
    """The permissions `open()` / `mkdir()` would give a new file (0o666) or folder (0o777) under the current umask
    (tempfile.mkstemp / mkdtemp create owner-only 0600 / 0700; atomic writers chmod their result to this)."""
    return mode & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it, briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike):
    """Write a folder atomically: yields a temporary folder beside `out` to fill; on success it takes `out`'s place
    (an existing `out` is moved aside, then deleted), with the permissions the umask gives; on error it is removed and
    `out` is untouched."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            os.chmod(file, umask_mode(0o777 if file.is_dir() else 0o666))
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp made it owner-only
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / out.name, out)  # put the previous folder back
                shutil.rmtree(old)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


_HOST = socket.gethostname().replace(".", "_")


def _temp_prefix(path: Path) -> str:
    """Prefix of `path`'s temporaries: ".NAME.HOST." (then the writer's pid), so that stale ones can be told apart."""
    return f".{path.name}.{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files left beside `path` by writers on this host that no longer run (killed mid-write)."""
    for temp in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        try:
            pid = int(temp.name[len(_temp_prefix(path)) :].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by a writer that was killed", temp)
            temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: folders cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path` for writing (`mode` "wb" or "w") and yield it; on success it is flushed
    to disk and takes `path`'s place (then the folder is synced), with the permissions the umask gives; on error it
    is removed and `path` is untouched. A reader sees the old file or the new one, never a partial one, even after a
    kill -9 or a power cut; temporaries of killed writers on this host are removed by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path.parent)


def write_json(metrics: dict, path: str | os.PathLike) -> Path:
    """Write `metrics` (any JSON tree) to `path` as JSON, atomically; nan and inf become null at any depth."""
    clean = finite_or_none(metrics)
    with atomic_file(path, "w") as f:
        json.dump(clean, f, indent=2, allow_nan=False)
        f.write("\n")
    return Path(path)
