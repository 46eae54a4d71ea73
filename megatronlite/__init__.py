"""megatronlite: Megatron-style GPT pretraining in a codebase small enough to read in an afternoon.

`load_model` and `generate` are imported on first use (PEP 562): importing the package must not
import torch, because every command, `--help` and each spawned preprocess worker import it first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatronlite.checkpoint.model_loader import load_model
    from megatronlite.train.generate import generate

__all__ = ["generate", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from megatronlite.checkpoint.model_loader import load_model

        return load_model
    if name == "generate":
        from megatronlite.train.generate import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
