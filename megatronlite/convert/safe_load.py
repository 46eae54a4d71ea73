"""Reading `.pt` files without running code from them.

`torch.load(weights_only=True)` rebuilds tensors and plain containers only. Megatron-LM files also
pickle an `argparse.Namespace` (its args, which hold the model's shape) and, beside the weights,
objects we never use: numpy RNG state, Megatron enums, Transformer Engine extra state. The
Namespace is allowed as itself; each other global named in the file is bound to `Placeholder`,
an inert class, so unpickling it constructs nothing of the file's choosing. Tensors are
memory-mapped, so opening a file reads no weights.
"""

from __future__ import annotations

import argparse
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from megatronlite.errors import UserError

REBUILT = {"argparse.Namespace": argparse.Namespace, "types.SimpleNamespace": types.SimpleNamespace}


class Placeholder:
    """Stands in for any other pickled object: accepts whatever it is built from and keeps none of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        allowed = [REBUILT[n] if n in REBUILT else (Placeholder, n) for n in names]
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable torch file ({first})") from None
