"""The per-chunk steps of the fused linear + cross-entropy in Triton (the driver is linear_cross_entropy.py).

`stats` makes one pass over each row with an online max and sum of exponentials, reading only the
real vocabulary columns; `grad_` makes one more pass, writing softmax minus one-hot over the logits
in place, so the chunk needs no second buffer. One program per row.
"""

from __future__ import annotations

import torch

from megatronlite.kernels.linear_cross_entropy import ChunkOps
from megatronlite.kernels.triton_runtime import num_warps, tl, triton

_MAX_BLOCK = 4096


@triton.jit
def _stats_kernel(LOGITS, TARGET, MAX, SUM, PICKED, stride, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    row_max = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.full([], 0.0, tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
    target = tl.load(TARGET + row)
    tl.store(MAX + row, row_max)
    tl.store(SUM + row, sum_exp)
    tl.store(PICKED + row, tl.load(base + target, mask=target >= 0, other=0.0))


@triton.jit
def _grad_kernel(LOGITS, TARGET, MAX, SUM, stride, n_cols, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    row_max = tl.load(MAX + row)
    inv_sum = 1.0 / tl.load(SUM + row)
    target = tl.load(TARGET + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.exp(tl.load(base + cols, mask=mask, other=0.0) - row_max) * inv_sum
        p = tl.where(cols < n_valid, p, 0.0)
        p = tl.where(cols == target, p - 1.0, p)
        tl.store(base + cols, p, mask=mask)


def _block(n_cols: int) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK)


def ce_stats(logits: torch.Tensor, target: torch.Tensor, n_valid: int) -> tuple[torch.Tensor, ...]:
    rows = logits.shape[0]
    row_max, sum_exp, picked = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    block = _block(n_valid)
    _stats_kernel[(rows,)](
        logits, target, row_max, sum_exp, picked, logits.stride(0), n_valid, BLOCK=block, num_warps=num_warps(block)
    )
    return row_max, sum_exp, picked


def ce_grad_(
    logits: torch.Tensor, target: torch.Tensor, n_valid: int, row_max: torch.Tensor, sum_exp: torch.Tensor
) -> None:
    rows, cols = logits.shape
    block = _block(cols)
    _grad_kernel[(rows,)](
        logits,
        target,
        row_max,
        sum_exp,
        logits.stride(0),
        cols,
        n_valid,
        BLOCK=block,
        num_warps=num_warps(block),
    )


CE_CHUNK_OPS = ChunkOps(stats=ce_stats, grad_=ce_grad_)
