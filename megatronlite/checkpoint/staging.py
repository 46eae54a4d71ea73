"""Staging for async saves: a snapshot of the state in CPU memory, taken while training waits.

The buffers are allocated (and their pages touched) when training starts, then reused by every
save (pinned on CUDA, so the copy is a fast device-to-host DMA): staging costs one memcpy of the
state, the first save included, and a machine short of memory for them fails at start-up rather
than hours later at the first checkpoint. A buffer is the size of its piece: with the distributed
optimizer, of this rank's boxes of the Adam states, never of the full states. The writer thread
hands the staged pieces to DCP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatronlite.checkpoint.views import GlobalPiece


class PieceStager:
    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}  # by (key, offset)

    def _buffer(self, piece: GlobalPiece) -> torch.Tensor:
        index, like = (piece.key, tuple(piece.offset)), piece.local
        buf = self.buffers.get(index)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self.buffers[index] = torch.zeros(like.shape, dtype=like.dtype, pin_memory=self.pin_memory)
        return buf

    def reserve(self, pieces: Sequence[GlobalPiece]) -> None:
        """Allocate the buffers for pieces like these now (zeroed, so the pages are really there)."""
        for piece in pieces:
            self._buffer(piece)

    def stage(self, pieces: Sequence[GlobalPiece]) -> list[GlobalPiece]:
        out = []
        for piece in pieces:
            buf = self._buffer(piece)
            buf.copy_(piece.local, non_blocking=self.pin_memory)
            out.append(GlobalPiece(piece.key, buf, piece.global_shape, piece.offset))
        if self.pin_memory:
            torch.cuda.synchronize()
        return out
