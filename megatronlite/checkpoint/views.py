"""The layout-free view of a rank's state: local memory described as boxes of global tensors.

A parameter (or one of its optimizer states) becomes one piece per fused part, keyed by its
global name: a view of this rank's local memory and the offset of that view in the global
(unpadded) tensor. With the distributed optimizer a rank holds only a flat slice of a
parameter's Adam states; the slice becomes a few boxes (a partial first row, a block of whole
rows, a partial last row), each a view of the flat state. Padding rows are never part of a
view. Saving these views and loading into the views of another layout is what makes
checkpoints independent of TP, PP and DP (see planner.py for how DCP writes and reads them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatronlite.models.init import part_name
from megatronlite.parallel.mesh import Mesh
from megatronlite.parallel.sharding import Sharding

ADAM_STATES = ("exp_avg", "exp_avg_sq")  # a checkpoint's `optim.<state>.<global name>`

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape)


@dataclass
class GlobalPiece:
    """One box of a global tensor held in this rank's memory. A key may have several on one rank."""

    key: str  # the global tensor's name in the checkpoint
    local: torch.Tensor  # a view into this rank's memory, shaped like the box
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]  # where `local` starts in the global tensor

    @property
    def is_whole(self) -> bool:
        return tuple(self.local.shape) == tuple(self.global_shape)


def flat_boxes(start: int, end: int, shape: tuple[int, ...]) -> list[Box]:
    """Elements [start, end) of a row-major tensor shaped `shape`, as boxes each contiguous in memory.

    Along dim 0: a partial first row, a block of whole rows, a partial last row; a partial row is
    split the same way one dim down. So there are at most 2 * ndim - 1 boxes, in memory order."""
    if start >= end:
        return []
    if len(shape) == 1:
        return [((start,), (end - start,))]
    inner = math.prod(shape[1:])
    first, last = -(-start // inner), end // inner  # the whole rows are [first, last)
    if first > last:  # inside one row
        return _in_row(first - 1, start, end, shape)
    boxes = _in_row(first - 1, start, first * inner, shape) if start < first * inner else []
    if last > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if end > last * inner:
        boxes += _in_row(last, last * inner, end, shape)
    return boxes


def _in_row(row: int, start: int, end: int, shape: tuple[int, ...]) -> list[Box]:
    """The boxes of elements [start, end) (flat indices) of row `row` of dim 0."""
    base = row * math.prod(shape[1:])
    return [((row, *o), (1, *s)) for o, s in flat_boxes(start - base, end - base, shape[1:])]


def _flat_index(offset: tuple[int, ...], shape: tuple[int, ...]) -> int:
    index = 0
    for i, n in zip(offset, shape):
        index = index * n + i
    return index


def _part_pieces(
    name: str, box: torch.Tensor, offset: tuple[int, ...], local_shape: tuple[int, ...], spec: Sharding, mesh: Mesh
) -> list[GlobalPiece]:
    """A box of a local tensor shaped like its parameter, cut along the TP dim into its fused parts' real rows
    (padding dropped), each in its part's global coordinates (expert weights: after this rank's experts)."""
    ep = spec.split("ep")
    if ep is not None:  # this expert-parallel rank's block of experts starts at rank x its block
        at = list(offset)
        at[ep.dim] += mesh.role("expert").rank * local_shape[ep.dim]
        offset = tuple(at)
    if spec.dim is None:
        return [GlobalPiece(name, box, spec.global_shape, offset)]
    dim, names = spec.dim, spec.part_names()
    lo, hi = spec.local_rows(mesh.tp_rank, mesh.tp)  # this rank's rows of every part, global
    rows = local_shape[dim] // len(names)  # each part's local rows, padding included
    out = []
    for i, part in enumerate(names):
        a, b = max(offset[dim], i * rows), min(offset[dim] + box.shape[dim], i * rows + hi - lo)
        if a < b:
            at = list(offset)
            at[dim] = lo + a - i * rows
            view = box.narrow(dim, a - offset[dim], b - a)
            out.append(GlobalPiece(part_name(name, part), view, spec.global_shape, tuple(at)))
    return out


def tensor_pieces(name: str, tensor: torch.Tensor, spec: Sharding, mesh: Mesh) -> list[GlobalPiece]:
    """A local tensor shaped like its parameter as global pieces, one per fused part."""
    return _part_pieces(name, tensor, (0,) * tensor.ndim, tuple(tensor.shape), spec, mesh)


def slice_pieces(
    name: str, flat: torch.Tensor, start: int, local_shape: tuple[int, ...], spec: Sharding, mesh: Mesh
) -> list[GlobalPiece]:
    """Elements [start, start + flat.numel()) of a local tensor shaped `local_shape` (a parameter's TP shard),
    held flat in `flat` (a ZeRO-1 slice's Adam state), as global pieces: views of `flat`, no copy."""
    out = []
    for offset, shape in flat_boxes(start, start + flat.numel(), local_shape):
        at = _flat_index(offset, local_shape) - start
        box = flat[at : at + math.prod(shape)].view(shape)
        out += _part_pieces(name, box, offset, local_shape, spec, mesh)
    return out


def stored_name(name: str, spec: Sharding, for_save: bool) -> str | None:
    """The global name a local tensor is saved under or loaded from (None: not saved).

    A tied copy (`spec.alias`) holds the same values as its source: it is never saved, and loads from
    the source's key, so every copy of a shared tensor (and of its optimizer state) is restored."""
    if spec.alias is None:
        return name
    return None if for_save else spec.alias


def model_pieces(named_params: dict[str, torch.nn.Parameter], mesh: Mesh, for_save: bool) -> list[GlobalPiece]:
    """Global pieces of the parameters, keyed `model.<global name>`."""
    out = []
    for name, p in named_params.items():
        stored = stored_name(name, p.sharding, for_save)
        if stored is not None:
            out += tensor_pieces(f"model.{stored}", p.data, p.sharding, mesh)
    return out


def router_bias_pieces(moe_layers: dict) -> list[GlobalPiece]:
    """The MoE layers' selection biases (aux-loss-free balancing; `{global layer id: layer}`), whole on every rank:
    state, not weights, stored as `state.layers.<id>.mlp.bias`."""
    return [
        GlobalPiece(f"state.layers.{i}.mlp.bias", layer.bias, tuple(layer.bias.shape), (0,))
        for i, layer in moe_layers.items()
        if layer.bias is not None
    ]
