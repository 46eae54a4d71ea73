"""File-backed tensors for writers that keep every tensor alive until the end.

`torch.save` serializes one object, so a `.pt` of a whole model needs every tensor alive during
the call; DCP's FileSystemWriter keeps each tensor it wrote until its (single) file is closed.
Parking each tensor in its own memory-mapped file as it is made keeps them out of process
memory: the kernel pages them in while they are copied out and can drop them again, so the
converter itself holds one rule's tensors at a time. The cost is writing the data twice. The
files are deleted afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


class Staging:
    def __init__(self, near: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=".staging-", dir=near))
        self._count = 0

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of `t`."""
        self._count += 1
        path = self.dir / f"{self._count}.bin"
        out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        out.copy_(t)
        return out
