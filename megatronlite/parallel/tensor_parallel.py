"""Tensor-parallel layers holding local shards.

Every parameter is a `ShardedParameter` whose `Sharding` (sharding.py) says how its local
tensor is cut from the global one: which dim is split over TP, whether it is several fused
parts (QKV is one grouped tensor; SwiGLU's fc1 is [gate; up], each part split on its own),
and its global (unpadded) shape.

At TP = 1 these are ordinary linear and embedding layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatronlite.models.precision import to_compute_dtype
from megatronlite.parallel.mappings import copy_to_tp, gather_tokens, reduce_from_tp, reduce_scatter_tokens
from megatronlite.parallel.mesh import Mesh
from megatronlite.parallel.sharding import empty_param, replicated, tp_split


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
        alias: str | None = None,
    ) -> None:
        """`alias`: the weight is a copy of that global tensor (a tied output layer), never saved on its own."""
        super().__init__()
        n_parts = len(parts) or 1
        part_out = out_features // n_parts
        local_part = (padded or part_out) // mesh.tp
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.weight = empty_param(
            (local_part * n_parts, in_features), tp_split((part_out, in_features), 0, parts, padded, alias=alias)
        )
        bias_sharding = tp_split((part_out,), 0, parts, padded, "zeros")
        self.bias = empty_param((local_part * n_parts,), bias_sharding) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.mesh, self.sequence_parallel)

    def forward_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One GEMM per fused part, each output contiguous on its own.

        The product of `forward`, split along the last dim; faster where elementwise torch code
        follows (on CPU, ops over strided halves of the fused output cost more than the GEMM saves).
        """
        x = _tp_input(x, self.mesh, self.sequence_parallel)
        n = len(self.weight.sharding.part_names())
        biases = [None] * n if self.bias is None else self.bias.chunk(n)
        return [F.linear(x, w, b) for w, b in zip(self.weight.chunk(n), biases)]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: the input arrives split, partial outputs are summed."""

    def __init__(
        self, in_features: int, out_features: int, mesh: Mesh, bias: bool = False, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.weight = empty_param(
            (out_features, in_features // mesh.tp), tp_split((out_features, in_features), 1, init="scaled_normal")
        )
        bias_sharding = replicated((out_features,), "zeros", sequence_parallel)
        self.bias = empty_param((out_features,), bias_sharding) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_tokens(y, self.mesh.tp_group)
        else:
            y = reduce_from_tp(y, self.mesh.tp_group)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # an fp32 bias would make the sum fp32


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns, the rest are zero."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, mesh: Mesh, sequence_parallel: bool = False):
        super().__init__()
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.per_rank = padded_vocab // mesh.tp
        self.weight = empty_param((self.per_rank, dim), tp_split((vocab_size, dim), 0, padded=padded_vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp == 1:
            out = F.embedding(ids, self.weight)
        else:
            start = self.mesh.tp_rank * self.per_rank
            local = ids - start
            outside = (local < 0) | (local >= self.per_rank)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        out = to_compute_dtype(out)  # the sum over TP and the residual stream in the compute dtype, as Megatron's
        if self.sequence_parallel:
            return reduce_scatter_tokens(out, self.mesh.tp_group)
        return reduce_from_tp(out, self.mesh.tp_group)


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mesh: Mesh, sequence_parallel: bool
) -> torch.Tensor:
    """The column-parallel product: also the output layer, whose weight may be the (tied) embedding's."""
    return F.linear(_tp_input(x, mesh, sequence_parallel), weight, bias)


def _tp_input(x: torch.Tensor, mesh: Mesh, sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel layer's input: the whole micro-batch (its token blocks gathered under SP) on every TP rank."""
    if sequence_parallel:
        return gather_tokens(x, mesh.tp_group)
    return copy_to_tp(x, mesh.tp_group)
