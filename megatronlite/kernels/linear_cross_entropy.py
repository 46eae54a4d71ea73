"""Output layer and cross-entropy in one pass over token chunks, so the full logits never exist.

For each chunk of tokens: logits = hidden @ weight_shard.T (fp32, [chunk, V/TP]); a backend's
`stats` gives each row's max, sum of exponentials and target logit over this rank's vocabulary
slice; these are combined over the TP group exactly as parallel/cross_entropy.py does (max by
all-reduce MAX, the rescaled sums and the target logit by one all-reduce SUM); the backend's `grad_`
turns the logits into d(loss_i)/d(logits) in place; and that chunk's gradients for the hidden
states and the weight are accumulated right away, the weight's by one GEMM into a single fp32
gradient. Backward then only scales the saved gradients by grad / n, which is why the result is
the mean loss (a scalar) rather than per-token losses. The 1/n is applied there, in fp32, and not
to the chunk's gradient before its cast: in fp16 the small softmax terms divided by n would flush
to zero.

Chunks are as long as a memory budget for one chunk's fp32 logits allows (thousands of tokens at a
128k vocabulary), so each GEMM is large and the [V/TP, h] gradient is read and written once per
chunk. Without gradients (no_grad, or inputs that need none: evaluation) only the loss is computed.

Memory: the saved gradients (hidden's [N, h], weight's [V/TP, h] in fp32) live from forward to
backward. On the last pipeline stage 1F1B runs each micro-batch's backward right after its
forward, so one set is alive at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

CHUNK_BYTES = 1 << 30  # one chunk's fp32 logits; its compute-dtype copies take about as much again


class ChunkOps(NamedTuple):
    """A backend's per-chunk primitives (reference.py and triton_cross_entropy.py each provide one).

    stats(logits, target, n_valid) -> (row max, sum of exp(x - row max), target logit), fp32 [rows];
    grad_(logits, target, n_valid, row_max, sum_exp) overwrites logits with softmax minus one-hot.
    `target` is the local column or -1; columns from `n_valid` on are padding.
    """

    stats: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grad_: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor], None]


class _Result(NamedTuple):
    """The mean loss, and the gradients of the summed loss (None where not asked for)."""

    loss: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None


def default_chunk_size(n_tokens: int, vocab_local: int) -> int:
    """As many tokens as fit their fp32 logits in CHUNK_BYTES (all of them, if they fit)."""
    return max(1, min(n_tokens, CHUNK_BYTES // (4 * vocab_local)))


@functools.cache
def _mixed_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm sums `dtype` factors into an fp32 output on `device` (CUDA, recent torch).

    Then the weight gradient's GEMM runs at `dtype` speed; elsewhere it runs on the fp32 gradient
    of the logits (which the chunk holds anyway) and an fp32 copy of the chunk's hidden states.
    """
    acc, ones = torch.zeros(2, 2, device=device), torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return bool((acc == 2).all())


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


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    group: dist.ProcessGroup | None,
    chunk_size: int,
    ops: ChunkOps,
    want_hidden: bool,
    want_weight: bool,
) -> _Result:
    """The loop of the module doc; the gradients are left out (never computed) where not wanted."""
    n, v_local = hidden.shape[0], weight.shape[0]
    start = 0 if group is None else dist.get_rank(group) * v_local
    n_valid = min(max(vocab_size - start, 0), v_local)
    local_target = target - start
    local_target = local_target.masked_fill((local_target < 0) | (local_target >= n_valid), -1)
    dtype = _compute_dtype(hidden, weight)
    h_all, w = hidden.to(dtype), weight.to(dtype)
    mixed = dtype != torch.float32 and _mixed_addmm(hidden.device, dtype)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for s in range(0, n, chunk_size):
        h, t = h_all[s : s + chunk_size], local_target[s : s + chunk_size]
        logits = (h @ w.T).float()
        row_max, sum_exp, picked = _combine_over_tp(*ops.stats(logits, t, n_valid), group)
        losses[s : s + chunk_size] = sum_exp.log() + row_max - picked
        if not (want_hidden or want_weight):
            continue
        ops.grad_(logits, t, n_valid, row_max, sum_exp)
        g = logits.to(dtype)
        if grad_hidden is not None:
            grad_hidden[s : s + chunk_size] = g @ w
        if grad_weight is not None and mixed:  # one GEMM straight into the fp32 sum, no [V, h] temporary
            torch.addmm(grad_weight, g.T, h, out_dtype=torch.float32, out=grad_weight)
        elif grad_weight is not None:  # logits holds the gradient in fp32
            grad_weight.addmm_(logits.T, h.float())
    return _Result(losses.mean(), grad_hidden, grad_weight)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size, group, chunk_size, ops):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        result = _chunked(hidden, weight, target, vocab_size, group, chunk_size, ops, want_hidden, want_weight)
        ctx.save_for_backward(result.grad_hidden, result.grad_weight)
        ctx.weight_dtype, ctx.n_tokens = weight.dtype, hidden.shape[0]
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float() / ctx.n_tokens
        return (
            None if grad_hidden is None else (grad_hidden.float() * scale).to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
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
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, target, vocab_size, tp_group, chunk_size, ops)
    return _chunked(hidden, weight, target, vocab_size, tp_group, chunk_size, ops, False, False).loss
