"""Checkpoint conversion between megatronlite (`mlite`), HuggingFace (`hf`), Megatron-LM (`megatron`)
and one consolidated torch file (`torch`), in every direction.

Every format is read into one shape, a `Checkpoint`: a megatronlite config and each global
tensor on demand, by our names (`checkpoint.py`). A format is a list of `Rule`s tying a few of
its tensors to a few of ours with a reshaping each way (`mapping.py`); the same rules read and
write, and run on `meta` tensors they give every shape before any data moves. So a conversion
checks the source's names and shapes first, then moves one rule's tensors at a time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatronlite.convert.formats import FORMATS, convert, read
    from megatronlite.convert.model_state import Checkpoint, Options

__all__ = ["FORMATS", "Checkpoint", "Options", "convert", "read"]

# imported on first use (PEP 562): `convert --help` reaches this package and must not import torch
_HOMES = {
    "FORMATS": "formats",
    "convert": "formats",
    "read": "formats",
    "Checkpoint": "model_state",
    "Options": "model_state",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"megatronlite.convert.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
