"""The collectives of tensor and sequence parallelism as small autograd functions.

Each forward collective has its adjoint in backward (all-reduce <-> identity, all-gather <->
reduce-scatter, split <-> all-gather). With no group (TP = 1) every function is the identity,
so the same model code runs on one process.

Sequence parallelism (SP) shards tokens, not sequence positions: an SP shard is a contiguous block
of the micro-batch's tokens in [b * s] order (rank r holds rows [r * b * s / TP, (r + 1) * b * s / TP)
of the flat [b * s, h] view), viewed as [b, s / TP, h]. That is what Megatron's [s, b, h] layout
gives along dim 0, so both collectives (`gather_tokens`, `reduce_scatter_tokens`) run in place,
straight into and out of the activation; a split of dim 1 of [b, s, h] would cost copies each way.
It is exact because all work between them is token-wise (norms, residual adds, MoE routing of
flattened tokens); a per-position lookup there takes its positions' shard (`sequence_shard`).
Collectives along a real dim (`gather_from_tp`, context parallelism's `gather_from_sp`) keep its order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """All-gather along `dim` through one [size, *x.shape] buffer: moving the rank dim to `dim` is a view (in
    place) when every dim before `dim` has size 1, else one copy (the list API made two)."""
    dim = dim % x.dim()
    out = x.new_empty(_size(group), *x.shape)
    dist.all_gather_into_tensor(out.view(-1), x.contiguous().view(-1), group=group)
    return out.movedim(0, dim).flatten(dim, dim + 1)


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x.chunk(_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Reduce-scatter along `dim` (the adjoint of `_all_gather`): the rank blocks are x itself (in place) when
    every dim before `dim` has size 1 and x is contiguous, else one contiguous copy of them."""
    dim = dim % x.dim()
    blocks = x.unflatten(dim, (_size(group), -1)).movedim(dim, 0).contiguous()
    out = x.new_empty(blocks.shape[1:])
    dist.reduce_scatter_tensor(out.view(-1), blocks.view(-1), group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient: the input of a column-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: the output of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along `dim` forward, keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    """Sequence parallel: all-gather the sequence forward, reduce-scatter the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Sequence parallel: reduce-scatter forward (replaces the row-parallel all-reduce), all-gather backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromTP.apply(x, dim, group)


def gather_from_sp(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """All-gather along `dim` in rank order (its gradient reduce-scattered back)."""
    return x if _size(group) == 1 else _GatherFromSP.apply(x, dim, group)


def reduce_scatter_to_sp(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Reduce-scatter along `dim`: rank r keeps block r of the sum (its gradient all-gathered)."""
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, dim, group)


def gather_tokens(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sequence parallelism: the micro-batch [b, s, h] from every rank's token block [b, s / TP, h], in place."""
    return gather_from_sp(x.flatten(0, 1), 0, group).unflatten(0, (x.shape[0], -1))


def reduce_scatter_tokens(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sequence parallelism: this rank's token block [b, s / TP, h] of the sum of [b, s, h] over TP, in place."""
    return reduce_scatter_to_sp(x.flatten(0, 1), 0, group).unflatten(0, (x.shape[0], -1))


def sequence_shard(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s SP shard [b, s / size, ...] of a whole micro-batch's [b, s, ...] (positions, hidden states)."""
    return x.flatten(0, 1).chunk(size)[rank].unflatten(0, (x.shape[0], -1))


class _AllToAll(torch.autograd.Function):
    """Rows exchanged all-to-all with uneven counts (expert parallelism's token dispatch); the gradient goes
    back the same way with the counts swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        grad = g.new_empty(sum(in_splits), *g.shape[1:])
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group) -> torch.Tensor:
    """Send rows [sum(in_splits[:r]), +in_splits[r]) of `x` to rank r; receive out_splits[r] rows from rank r."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
