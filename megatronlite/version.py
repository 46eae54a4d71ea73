"""Versions recorded in checkpoints, so a user can tell what wrote one."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def versions() -> dict[str, str]:
    try:
        mine = version("megatronlite")
    except PackageNotFoundError:
        mine = "unknown"
    return {"megatronlite": mine, "torch": torch.__version__, "python": platform.python_version()}
