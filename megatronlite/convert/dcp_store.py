"""Tensors of a torch.distributed.checkpoint (DCP) directory, read one box at a time.

Both our native checkpoints and Megatron's `torch_dist` format are DCP directories. A name in a
store is a box of a stored tensor: the whole tensor, or (Megatron) one layer of a tensor that
stacks all layers on a leading dim. Reading a box reads just the bytes of the chunks it overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatronlite.checkpoint.weights import read_chunk
from megatronlite.untrusted import read_dcp_metadata


@dataclass(frozen=True)
class Box:
    key: str  # the stored tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    stacked: bool = False  # one entry of the leading (layer) dim: the name drops that dim

    @property
    def value_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


def stored_tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor in a DCP directory (non-tensor entries left out)."""
    md = read_dcp_metadata(directory)
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def whole(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Box:
    return Box(key, (0,) * len(shape), shape, dtype)


class DcpStore:
    def __init__(self, directory: Path, boxes: dict[str, Box]) -> None:
        self.where, self.boxes = directory, boxes

    def keys(self) -> list[str]:
        return list(self.boxes)

    def meta(self, name: str) -> torch.Tensor:
        box = self.boxes[name]
        return torch.empty(box.value_shape, dtype=box.dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        box = self.boxes[name]
        return read_chunk(self.where, box.key, box.offsets, box.shape, box.dtype).reshape(box.value_shape)
