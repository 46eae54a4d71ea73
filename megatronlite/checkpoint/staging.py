"""Staging for async saves: a snapshot of the state in CPU memory, taken while training waits.

The buffers are allocated once and reused by every later save (pinned on CUDA, so the copy is a
fast device-to-host DMA), so staging costs one memcpy of the state. DCP's own stagers do not
handle the ShardedTensors our layout-free pieces become, so we stage the pieces' local tensors
before wrapping them, and hand DCP an already-staged state through `AlreadyStaged`.
"""

from __future__ import annotations

import torch

from megatronlite.checkpoint.views import GlobalPiece


class PieceStager:
    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, pieces: dict[str, GlobalPiece]) -> dict[str, GlobalPiece]:
        out = {}
        for key, piece in pieces.items():
            buf = self.buffers.get(key)
            if buf is None or buf.shape != piece.local.shape:
                buf = self.buffers[key] = torch.empty(
                    piece.local.shape, dtype=piece.local.dtype, pin_memory=self.pin_memory
                )
            buf.copy_(piece.local, non_blocking=self.pin_memory)
            out[key] = GlobalPiece(buf, piece.global_shape, piece.offset, piece.chunks)
        if self.pin_memory:
            torch.cuda.synchronize()
        return out


class AlreadyStaged:
    """DCP's AsyncStager protocol for a state that is already a private CPU snapshot."""

    _synchronize_after_execute = False

    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        return None

    def close(self) -> None:
        return None
