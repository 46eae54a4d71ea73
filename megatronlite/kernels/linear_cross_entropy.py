"""Output layer and cross-entropy in one pass over token chunks, so the full logits never exist.

For each chunk of tokens: logits = hidden @ weight_shard.T (fp32, [chunk, V/TP]); a backend's
`stats` gives each row's max, sum of exponentials and target logit over this rank's vocabulary
slice; these are combined over the TP group exactly as parallel/cross_entropy.py does (max by
all-reduce MAX, the rescaled sums and the target logit by one all-reduce SUM); the backend's `grad_`
turns the logits into d(loss)/d(logits) in place; and that chunk's gradients for the hidden states
and the weight are accumulated right away. Backward then only scales the saved gradients by the
incoming one, which is why the result is the mean loss (a scalar) rather than per-token losses.

Memory: the saved gradients (hidden's [N, h], weight's [V/TP, h] in fp32) live from forward to
backward. On the last pipeline stage 1F1B runs each micro-batch's backward right after its
forward, so one set is alive at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist


class ChunkOps(NamedTuple):
    """A backend's per-chunk primitives (reference.py and triton_cross_entropy.py each provide one).

    stats(logits, target, n_valid) -> (row max, sum of exp(x - row max), target logit), fp32 [rows];
    grad_(logits, target, n_valid, row_max, sum_exp, scale) overwrites logits with the scaled gradient.
    `target` is the local column or -1; columns from `n_valid` on are padding.
    """

    stats: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grad_: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, float], None]


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_local: int) -> int:
    """Tokens per chunk such that one chunk's logits take about as much memory as all hidden states."""
    return math.ceil(n_tokens / math.ceil(vocab_local / hidden_size))


def _combine_over_tp(
    row_max: torch.Tensor, sum_exp: torch.Tensor, picked: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if group is None:
        return row_max, sum_exp, picked
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([sum_exp * torch.exp(row_max - global_max), picked])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_max, sums[0], sums[1]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size, group, chunk_size, ops):
        n, v_local = hidden.shape[0], weight.shape[0]
        start = 0 if group is None else dist.get_rank(group) * v_local
        n_valid = min(max(vocab_size - start, 0), v_local)
        local_target = target - start
        local_target = local_target.masked_fill((local_target < 0) | (local_target >= n_valid), -1)
        device = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else torch.promote_types(hidden.dtype, weight.dtype)
        )
        h_all, w = hidden.to(dtype), weight.to(dtype)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, n, chunk_size):
            h, t = h_all[s : s + chunk_size], local_target[s : s + chunk_size]
            logits = (h @ w.T).float()
            row_max, sum_exp, picked = _combine_over_tp(*ops.stats(logits, t, n_valid), group)
            losses[s : s + chunk_size] = sum_exp.log() + row_max - picked
            ops.grad_(logits, t, n_valid, row_max, sum_exp, 1.0 / n)
            g = logits.to(dtype)
            grad_hidden[s : s + chunk_size] = g @ w
            grad_weight += g.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int | None,
    ops: ChunkOps,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden [..., h] @ weight.T` against `target [...]`, chunked; see the module doc."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, target, vocab_size, tp_group, chunk_size, ops)
