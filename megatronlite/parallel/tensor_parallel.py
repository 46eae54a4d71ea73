"""Tensor-parallel layers holding local shards, and the description of how a shard maps to its global tensor.

Every parameter carries a `ShardSpec` (`param.shard`): which dim is split over TP, whether it is
several fused parts (QKV is one grouped tensor; SwiGLU's fc1 is [gate; up], each part split on
its own), and its global (unpadded) shape. One description drives the seeded init (full tensor,
sliced), the layout-free checkpoint, and the HF/Megatron converters.

At TP = 1 these are ordinary linear and embedding layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatronlite.parallel.mappings import (
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from megatronlite.parallel.mesh import Mesh


@dataclass(frozen=True)
class ShardSpec:
    """How a local parameter relates to the global tensor(s) it is a slice of."""

    global_shape: tuple[int, ...]  # of one part, unpadded
    dim: int | None = None  # the dim split over TP; None: replicated on every TP rank
    parts: tuple[str, ...] = ()  # fused parts concatenated along `dim`, each split over TP on its own
    padded: int | None = None  # size of `dim` after padding (vocab), before the TP split
    init: str = "normal"  # normal | scaled_normal | zeros | ones
    sequence_parallel: bool = False  # grads are partial per sequence shard: all-reduce over TP
    alias: str | None = None  # a copy of another global tensor (a tied output layer on the last stage)

    def part_names(self) -> tuple[str, ...]:
        return self.parts or ("",)

    def local_slice(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's slice of one part's full (unpadded) tensor."""
        if self.dim is None:
            return full
        if self.padded is not None and self.padded > full.shape[self.dim]:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = self.padded - full.shape[self.dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
        return full.chunk(tp_size, dim=self.dim)[tp_rank]

    def local_rows(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """The [start, end) range of the global (unpadded) `dim` this rank holds, per part."""
        size = self.padded or self.global_shape[self.dim]
        per = size // tp_size
        start = min(tp_rank * per, self.global_shape[self.dim])
        return start, min(start + per, self.global_shape[self.dim])


def _param(local_shape: tuple[int, ...], spec: ShardSpec) -> nn.Parameter:
    p = nn.Parameter(torch.empty(local_shape))
    p.shard = spec
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; the output stays split (gather it if needed)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mesh: Mesh,
        bias: bool = False,
        parts: tuple[str, ...] = (),
        sequence_parallel: bool = False,
        padded: int | None = None,
    ) -> None:
        super().__init__()
        n_parts = len(parts) or 1
        part_out = out_features // n_parts
        local_part = (padded or part_out) // mesh.tp
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.weight = _param((local_part * n_parts, in_features), ShardSpec((part_out, in_features), 0, parts, padded))
        self.bias = _param((local_part * n_parts,), ShardSpec((part_out,), 0, parts, padded, "zeros")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.mesh, self.sequence_parallel)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One GEMM per fused part, each output contiguous on its own.

        The product of `forward`, split along the last dim; faster where elementwise torch code
        follows (on CPU, ops over strided halves of the fused output cost more than the GEMM saves).
        """
        x = _tp_input(x, self.mesh, self.sequence_parallel)
        n = len(self.weight.shard.part_names())
        biases = [None] * n if self.bias is None else self.bias.chunk(n)
        return [F.linear(x, w, b) for w, b in zip(self.weight.chunk(n), biases)]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: the input arrives split, partial outputs are summed."""

    def __init__(
        self, in_features: int, out_features: int, mesh: Mesh, bias: bool = False, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.weight = _param(
            (out_features, in_features // mesh.tp), ShardSpec((out_features, in_features), 1, init="scaled_normal")
        )
        spec = ShardSpec((out_features,), None, init="zeros", sequence_parallel=sequence_parallel)
        self.bias = _param((out_features,), spec) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, 1, self.mesh.tp_group)
        else:
            y = reduce_from_tp(y, self.mesh.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns, the rest are zero."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, mesh: Mesh, sequence_parallel: bool = False):
        super().__init__()
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.per_rank = padded_vocab // mesh.tp
        self.weight = _param((self.per_rank, dim), ShardSpec((vocab_size, dim), 0, padded=padded_vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp == 1:
            out = F.embedding(ids, self.weight)
        else:
            start = self.mesh.tp_rank * self.per_rank
            local = ids - start
            outside = (local < 0) | (local >= self.per_rank)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, 1, self.mesh.tp_group)
        return reduce_from_tp(out, self.mesh.tp_group)


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mesh: Mesh, sequence_parallel: bool
) -> torch.Tensor:
    """The column-parallel product: also the output layer, whose weight may be the (tied) embedding's."""
    return F.linear(_tp_input(x, mesh, sequence_parallel), weight, bias)


def _tp_input(x: torch.Tensor, mesh: Mesh, sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel layer's input: the whole sequence (gathered under SP) on every TP rank."""
    if sequence_parallel:
        return gather_from_sp(x, 1, mesh.tp_group)
    return copy_to_tp(x, mesh.tp_group)
