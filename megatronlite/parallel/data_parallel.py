"""Data-parallel gradient reduction: the mean of every gradient over the DP group."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatronlite.parallel.mesh import Mesh


def reduce_gradients(params: Iterable[torch.nn.Parameter], mesh: Mesh) -> None:
    """Average gradients over DP, and sum sequence-parallel partial gradients over TP."""
    grads = [p.grad for p in params if p.grad is not None]
    if mesh.tp > 1:
        sp = [p.grad for p in params if p.grad is not None and p.shard.sequence_parallel]
        for g in sp:
            dist.all_reduce(g, group=mesh.tp_group)
    if mesh.dp > 1:
        for g in grads:
            dist.all_reduce(g, group=mesh.dp_group)
            g /= mesh.dp
