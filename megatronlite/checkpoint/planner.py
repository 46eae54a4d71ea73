"""DCP planners that write and read global pieces as chunks of global tensors, through DCP's public types.

A rank's pieces (views.py) are boxes (offset, shape) of global tensors, several per key where a
ZeRO-1 slice spans rows. Saving turns each into one write item: `WriteItemType.TENSOR` for a
whole tensor (as DCP writes a plain tensor), `SHARD` for a box. DCP's coordinator collects every
rank's items into the metadata: one `TensorStorageMetadata` per key with the chunks of every
rank, the same kind DCP writes for ShardedTensors and DTensors (and that the checkpoints of
earlier megatronlite versions hold). A box replicated on several ranks (a TP shard on every DP
replica) has the same `MetadataIndex` (key, offset) everywhere, so DCP's dedup writes it once.

Loading asks DCP's resharding helper which stored chunks overlap each local box and reads the
overlaps straight into the views: nothing is gathered or copied through a full-size tensor.
Plain tensors passed in the state dict (RNG states) keep DCP's default handling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatronlite.checkpoint.views import GlobalPiece

Index = tuple[str, tuple[int, ...]]  # (key, offset): a piece's identity, as DCP's MetadataIndex compares


def _by_index(pieces: Sequence[GlobalPiece]) -> dict[Index, GlobalPiece]:
    out: dict[Index, GlobalPiece] = {}
    for piece in pieces:
        index = (piece.key, tuple(piece.offset))
        if index in out:
            raise ValueError(f"two pieces of {piece.key} at {list(piece.offset)} on one rank")
        out[index] = piece
    return out


def _chunk(piece: GlobalPiece) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(torch.Size(piece.offset), torch.Size(piece.local.shape))


def _write_item(piece: GlobalPiece) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(piece.key, torch.Size(piece.offset)),
        type=WriteItemType.TENSOR if piece.is_whole else WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=_chunk(piece),
            properties=TensorProperties(dtype=piece.local.dtype),
            size=torch.Size(piece.global_shape),
        ),
    )


class PieceSavePlanner(DefaultSavePlanner):
    """Writes the state dict's plain tensors as DCP does, and each piece as one chunk of its global tensor."""

    def __init__(self, pieces: Sequence[GlobalPiece]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = _by_index(pieces)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self.plan = dataclasses.replace(plan, items=plan.items + [_write_item(p) for p in self.pieces.values()])
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        piece = self.pieces.get((write_item.index.fqn, tuple(write_item.index.offset or ())))
        return super().resolve_data(write_item) if piece is None else piece.local


class PieceLoadPlanner(DefaultLoadPlanner):
    """Reads the state dict's plain tensors as DCP does, and into each piece the stored chunks' overlaps with it."""

    def __init__(self, pieces: Sequence[GlobalPiece]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = _by_index(pieces)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        boxes: dict[str, list[GlobalPiece]] = {}
        for piece in self.pieces.values():
            boxes.setdefault(piece.key, []).append(piece)
        items = []
        for key, pieces in boxes.items():
            md = self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise RuntimeError(f"checkpoint has no tensor {key}")
            if tuple(md.size) != tuple(pieces[0].global_shape):
                raise ValueError(f"checkpoint's {key} is {list(md.size)}, expected {list(pieces[0].global_shape)}")
            items += create_read_items_for_chunk_list(key, md, [_chunk(p) for p in pieces])
        return dataclasses.replace(plan, items=plan.items + items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        piece = self.pieces.get((read_item.dest_index.fqn, tuple(read_item.dest_index.offset or ())))
        if piece is None:
            return super().resolve_tensor(read_item)
        view = piece.local
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view
