"""Gradient clipping by the global norm over every rank, counting each distinct element once.

A TP-sharded parameter contributes its shard on every TP rank; a parameter replicated over TP
(norms, row-parallel biases) counts on TP rank 0 only; a tied output layer copy on the last
stage is skipped (its gradient was added to the embedding's). The squares are summed over the
TP and PP groups (and the grad group, dp x cp, when gradients are ZeRO-sharded over it; expert weights over
the EP group, and under ZeRO the expert_grad group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatronlite.parallel.mesh import Group, Mesh


def owned_grads(params: list[torch.nn.Parameter], mesh: Mesh) -> list[torch.Tensor]:
    """The gradients this rank counts in the global norm."""
    grads = []
    for p in params:
        if p.grad is None or p.sharding.alias is not None:
            continue
        if p.sharding.dim is None and mesh.tp_rank != 0:
            continue
        grads.append(p.grad)
    return grads


def global_grad_norm(
    parts: list[tuple[list[torch.Tensor], list[Group]]], mesh: Mesh, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global norm as a 0-dim fp32 tensor on `device` (no host sync here: whoever needs the number reads
    it), and this rank's own sum of squares before any reduction (non-finite where a local gradient is).

    `parts`: gradients with the groups their squares add up over besides TP and PP (ZeRO's shards, experts split
    over EP). torch._foreach_norm reads each gradient once, in fp32 whatever its dtype, without an fp32 copy.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    local = torch.zeros((), dtype=torch.float32, device=device)
    for grads, groups in parts:
        part = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            part = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        local = local + part
        for group in groups:
            if group.size > 1:
                dist.all_reduce(part, group=group.pg)
        total = total + part
    for group in (mesh.role(r) for r in ("tensor", "pipeline")):
        if group.size > 1:
            dist.all_reduce(total, group=group.pg)
    return total.sqrt(), local


def clip_grads(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place so their global norm is at most `max_norm` (0: no clipping), on the device:
    the factor is min(1, max_norm / norm), so no host decision (and no sync) is needed."""
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
