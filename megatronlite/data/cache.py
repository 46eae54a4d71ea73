"""Derived files (token caches, sample indices) built once, atomically, however many ranks ask at once.

Every cache file name carries a hash of everything that affects its content, so a stale file is never
reused. The first process to take the file lock builds; the others wait on it and then read. Each file is
written under a temporary name and renamed, so a killed build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock

from megatronlite.errors import made_dir


def directory(configured: str | None) -> Path:
    """Where a run's caches go: `data.cache_dir` when set, else the user's cache directory (XDG's rule).

    Per user, not per working directory: a corpus built once is found again from wherever a command runs.
    """
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatronlite"


def fingerprint(path: str | os.PathLike) -> list:
    """What identifies a file's content cheaply: absolute path, size, modification time, and the inode and its
    change time, which no copy that keeps times (`cp -p`, `rsync -a`, a tar with fixed mtimes) or `touch -d` sets
    back: a file rewritten with the same size and mtime is another file here."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def key(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_once(outputs: list[Path], build: Callable[[], None]) -> bool:
    """Run `build` unless every output exists; concurrent callers wait for the one that builds.

    Returns whether this call built them (False: they were found, or another process built them).
    """
    if all(p.exists() for p in outputs):
        return False
    made_dir(outputs[0].parent, "data.cache_dir")  # every cache file is directly in it
    with FileLock(str(outputs[0]) + ".lock"):
        if all(p.exists() for p in outputs):
            return False
        build()
        return True


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
