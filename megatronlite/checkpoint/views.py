"""The layout-free view of a rank's state: local tensors described as pieces of global tensors.

Each parameter (and each of its optimizer states) becomes one entry per fused part, keyed by
its global name, holding a view of this rank's local memory and the offset of that view in the
global (unpadded) tensor. Padding rows are never part of a view. Saving these views and loading
into the views of another layout is what makes checkpoints independent of TP, PP and DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatronlite.models.init import part_name
from megatronlite.parallel.mesh import Mesh
from megatronlite.parallel.sharding import Sharding


@dataclass
class GlobalPiece:
    local: torch.Tensor  # a view into this rank's memory
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]  # where `local` starts in the global tensor
    # every TP rank's (global rank, offset, shape) of this tensor, this rank's included
    chunks: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def is_whole(self) -> bool:
        return tuple(self.local.shape) == tuple(self.global_shape)


def pieces_of(name: str, tensor: torch.Tensor, spec: Sharding, mesh: Mesh) -> dict[str, GlobalPiece]:
    """Split a local tensor shaped like its parameter into global pieces, one per fused part."""
    names = spec.part_names()
    if spec.dim is None:
        return {name: GlobalPiece(tensor, spec.global_shape, (0,) * tensor.ndim)}
    out = {}
    per_part = tensor.shape[spec.dim] // len(names)
    chunks = []
    for r in range(mesh.tp):
        lo, hi = spec.local_rows(r, mesh.tp)
        if hi > lo:  # a rank holding only padding has no chunk
            offset, shape = [0] * tensor.ndim, list(spec.global_shape)
            offset[spec.dim], shape[spec.dim] = lo, hi - lo
            chunks.append((mesh.role("tensor").ranks[r], tuple(offset), tuple(shape)))
    start, end = spec.local_rows(mesh.tp_rank, mesh.tp)
    if end <= start:
        return out
    offset = [0] * tensor.ndim
    offset[spec.dim] = start
    for i, part in enumerate(names):
        view = tensor.narrow(spec.dim, i * per_part, end - start)
        out[part_name(name, part)] = GlobalPiece(view, spec.global_shape, tuple(offset), tuple(chunks))
    return out


def named_pieces(
    prefix: str, tensors: dict[str, tuple[torch.Tensor, Sharding]], mesh: Mesh, for_save: bool
) -> dict[str, GlobalPiece]:
    """Global pieces of named tensors shaped like their parameters (the weights, or one Adam state).

    A tied copy (`spec.alias`) holds the same values as its source: it is never saved, and loads from
    the source's key, so every copy of a shared tensor (and of its optimizer state) is restored."""
    out = {}
    for name, (tensor, spec) in tensors.items():
        if spec.alias is not None:
            if for_save:
                continue
            name = spec.alias
        out.update({f"{prefix}{k}": v for k, v in pieces_of(name, tensor, spec, mesh).items()})
    return out


def model_pieces(named_params: dict[str, torch.nn.Parameter], mesh: Mesh, for_save: bool) -> dict[str, GlobalPiece]:
    """Global pieces of the parameters, keyed `model.<global name>`."""
    return named_pieces("model.", {n: (p.data, p.sharding) for n, p in named_params.items()}, mesh, for_save)


def to_dcp(pieces: dict[str, GlobalPiece], mesh: Mesh) -> dict[str, torch.Tensor]:
    """DCP's form of the pieces: a whole tensor as itself (DCP dedups replicas across ranks), a
    partial one as a ShardedTensor over the TP group whose local shard sits at its global offset."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    out = {}
    for key, piece in pieces.items():
        if piece.is_whole:
            out[key] = piece.local
            continue
        device = piece.local.device
        shards = [ShardMetadata(list(off), list(shape), f"rank:{rank}/{device}") for rank, off, shape in piece.chunks]
        shard_md = next(md for md, (rank, _, _) in zip(shards, piece.chunks) if rank == mesh.rank)
        global_md = ShardedTensorMetadata(
            shards, torch.Size(piece.global_shape), TensorProperties(dtype=piece.local.dtype)
        )
        out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
            [Shard(piece.local, shard_md)], global_md, process_group=None
        )
    return out
