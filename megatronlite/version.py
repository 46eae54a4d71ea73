"""Versions: recorded in checkpoints, so a user can tell what wrote one, and reported by `doctor`."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

# distributions installed under another name too: PyTorch's own wheels of Triton are `pytorch-triton`
_ALSO_NAMED = {"triton": ("pytorch-triton",)}


def installed(dist: str) -> str | None:
    """The version of the distribution `dist` (or of its other names) installed here; None if absent."""
    for name in (dist, *_ALSO_NAMED.get(dist, ())):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str]:
    mine = installed("megatronlite") or "unknown"
    return {"megatronlite": mine, "torch": torch.__version__, "python": platform.python_version()}
