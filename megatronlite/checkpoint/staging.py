"""Staging for async saves: a snapshot of the state in CPU memory, taken while training waits.

The buffers are allocated (and their pages touched) when training starts, then reused by every
save (pinned on CUDA, so the copy is a fast device-to-host DMA): staging costs one memcpy of the
state, the first save included, and a machine short of memory for them fails at start-up rather
than hours later at the first checkpoint. DCP's own stagers do not handle the ShardedTensors
our layout-free pieces become, so we stage the pieces' local tensors and the writer thread
wraps the copies for DCP.
"""

from __future__ import annotations

import torch

from megatronlite.checkpoint.views import GlobalPiece


class PieceStager:
    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self.buffers[key] = torch.zeros(like.shape, dtype=like.dtype, pin_memory=self.pin_memory)
        return buf

    def reserve(self, pieces: dict[str, GlobalPiece]) -> None:
        """Allocate the buffers for pieces like these now (zeroed, so the pages are really there)."""
        for key, piece in pieces.items():
            self._buffer(key, piece.local)

    def stage(self, pieces: dict[str, GlobalPiece]) -> dict[str, GlobalPiece]:
        out = {}
        for key, piece in pieces.items():
            buf = self._buffer(key, piece.local)
            buf.copy_(piece.local, non_blocking=self.pin_memory)
            out[key] = GlobalPiece(buf, piece.global_shape, piece.offset, piece.chunks)
        if self.pin_memory:
            torch.cuda.synchronize()
        return out
