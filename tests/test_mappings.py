"""The TP / SP collectives on 2 gloo processes against single-process references, forward and backward: the
sequence-parallel token blocks (and that their collectives run in place), and the gathers along a real dim."""

from unittest import mock

import torch
import torch.distributed as dist
from helpers import spawn

from megatronlite.parallel.mappings import (
    gather_from_sp,
    gather_from_tp,
    gather_tokens,
    reduce_scatter_to_sp,
    reduce_scatter_tokens,
    sequence_shard,
)

TP = 2


def _randn(gen: torch.Generator, *shape: int) -> list[torch.Tensor]:
    """One tensor per rank, the same list on every rank."""
    return [torch.randn(*shape, generator=gen) for _ in range(TP)]


def _tokens(rank: int, world: int) -> None:
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2, 4, 3, generator=gen)  # [b, s, h] with b = 2: token blocks are not a dim-1 split
    partial, weights = _randn(gen, 2, 4, 3), _randn(gen, 2, 4, 3)

    # rank r's shard is the r-th block of the b * s tokens (here: sequence r), viewed as [b, s / TP, h]
    shard = sequence_shard(full, rank, world)
    assert shard.shape == (2, 2, 3) and torch.equal(shard.reshape(4, 3), full[rank])

    # gather: the whole micro-batch; its gradient is the reduce-scatter of every rank's gradient
    x = shard.clone().requires_grad_()
    gathered = gather_tokens(x, group)
    torch.testing.assert_close(gathered, full, rtol=0, atol=0)
    (gathered * weights[rank]).sum().backward()
    torch.testing.assert_close(x.grad, sequence_shard(sum(weights), rank, world))

    # reduce-scatter: this rank's block of the sum; its gradient is the gather of every rank's
    y = partial[rank].clone().requires_grad_()
    scattered = reduce_scatter_tokens(y, group)
    torch.testing.assert_close(scattered, sequence_shard(sum(partial), rank, world))
    (scattered * shard).sum().backward()
    torch.testing.assert_close(y.grad, full, rtol=0, atol=0)

    # round trips: gather then reduce-scatter sums TP copies; reduce-scatter then gather is the all-reduce
    torch.testing.assert_close(reduce_scatter_tokens(gather_tokens(shard, group), group), world * shard)
    torch.testing.assert_close(gather_tokens(reduce_scatter_tokens(partial[rank], group), group), sum(partial))

    # in place: the gather returns the buffer the collective wrote, x itself is sent; the reduce-scatter
    # reads the activation itself and writes the tensor it returns
    with mock.patch.object(dist, "all_gather_into_tensor", wraps=dist.all_gather_into_tensor) as gather:
        gathered = gather_tokens(shard, group)
    out, inp = gather.call_args.args
    assert out.data_ptr() == gathered.data_ptr() and inp.data_ptr() == shard.data_ptr()
    with mock.patch.object(dist, "reduce_scatter_tensor", wraps=dist.reduce_scatter_tensor) as scatter:
        scattered = reduce_scatter_tokens(partial[rank], group)
    out, inp = scatter.call_args.args
    assert out.data_ptr() == scattered.data_ptr() and inp.data_ptr() == partial[rank].data_ptr()


def _along_dims(rank: int, world: int) -> None:
    """Along a real dim with leading dims > 1 (context parallelism's K/V, [2, b, heads, s, d]; logits' vocab)."""
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(1)
    parts, weights = _randn(gen, 2, 2, 3, 4, 5), _randn(gen, 2, 2, 3, 8, 5)
    x = parts[rank].clone().requires_grad_()
    gathered = gather_from_sp(x, 3, group)
    torch.testing.assert_close(gathered, torch.cat(parts, dim=3), rtol=0, atol=0)
    (gathered * weights[rank]).sum().backward()
    torch.testing.assert_close(x.grad, sum(weights).chunk(world, dim=3)[rank])

    torch.testing.assert_close(reduce_scatter_to_sp(weights[rank], 3, group), sum(weights).chunk(world, dim=3)[rank])

    x = parts[rank][..., :4].clone().requires_grad_()  # the last dim, gathered over TP with a split backward
    gathered = gather_from_tp(x, -1, group)
    torch.testing.assert_close(gathered, torch.cat([p[..., :4] for p in parts], dim=-1), rtol=0, atol=0)
    grad = torch.randn(gathered.shape, generator=gen)
    gathered.backward(grad)
    torch.testing.assert_close(x.grad, grad.chunk(world, dim=-1)[rank], rtol=0, atol=0)


def test_sequence_parallel_token_blocks():
    spawn(_tokens, TP)


def test_collectives_along_a_dim():
    spawn(_along_dims, TP)


def test_sequence_shard_blocks_cover_the_tokens_in_order():
    x = torch.arange(3 * 8 * 2).view(3, 8, 2)  # 24 tokens, 12 per shard: a shard ends mid-sequence
    shards = [sequence_shard(x, r, TP) for r in range(TP)]
    assert all(s.shape == (3, 4, 2) for s in shards)
    assert torch.equal(torch.cat([s.reshape(-1, 2) for s in shards]), x.reshape(-1, 2))
    positions = torch.arange(8).expand(3, 8)  # [b, s] works as well as [b, s, h]
    assert sequence_shard(positions, 1, TP).tolist() == [[4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
