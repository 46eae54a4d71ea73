"""Multi-tensor AdamW in Triton: every tensor of a step in one launch, through pointer tables.

Choice: a pointer table rather than flattening. The parameters, their gradients (fresh tensors
each step) and the fp32 states stay ordinary per-tensor storage, so nothing about the model or the
checkpoint layout changes; each launch gets int64 tables of their addresses and a block table
mapping every program to (tensor, offset). A launch covers all tensors that share a device, a
gradient dtype and a model-copy dtype (usually one launch per step). Each program reads the fp32
master, the gradient and both moments, and writes the master, the moments and, for bf16/fp16
parameters, the rounded model copy, all in the same pass.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from megatronlite.kernels.reference import AdamWScalars
from megatronlite.kernels.triton_runtime import num_warps, tl, triton

_BLOCK = 4096
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(
    BLOCK_TENSOR,
    BLOCK_START,
    NUMEL,
    ADDRS,
    SCALARS,
    n_tensors,
    GRAD_DTYPE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr,
    HAS_MODEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    offs = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(NUMEL + t)
    master = tl.load(ADDRS + t).to(tl.pointer_type(tl.float32))
    grad = tl.load(ADDRS + n_tensors + t).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg = tl.load(ADDRS + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
    exp_avg_sq = tl.load(ADDRS + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
    s = SCALARS + t * 6
    decay, beta1, beta2 = tl.load(s), tl.load(s + 1), tl.load(s + 2)
    eps, step_size, bias_correction2_sqrt = tl.load(s + 3), tl.load(s + 4), tl.load(s + 5)

    p = tl.load(master + offs, mask=mask) * decay
    g = tl.load(grad + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg + offs, mask=mask)
    m = m + (1.0 - beta1) * (g - m)
    v = tl.load(exp_avg_sq + offs, mask=mask) * beta2 + (1.0 - beta2) * g * g
    p -= step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(master + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)
    tl.store(exp_avg_sq + offs, v, mask=mask)
    if HAS_MODEL:
        model = tl.load(ADDRS + 4 * n_tensors + t).to(tl.pointer_type(MODEL_DTYPE))
        tl.store(model + offs, p.to(MODEL_DTYPE), mask=mask)


@functools.lru_cache(maxsize=16)
def _block_table(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor index, start offset) of every block, and each tensor's numel: fixed while the shapes are."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    blocks = (sizes + _BLOCK - 1) // _BLOCK
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    start = (torch.arange(len(tensor), dtype=torch.int64) - first[tensor.long()]) * _BLOCK
    return tensor.to(device), start.to(device), sizes.to(device)


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host table on `device` with no stream sync: on a GPU from pinned memory, copied asynchronously (a
    pageable copy would wait for every kernel queued before it)."""
    cuda = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def _addresses(*tensor_lists: list[torch.Tensor]) -> list[int]:
    for tensors in tensor_lists:
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError(f"the fused AdamW needs contiguous tensors, got strides {t.stride()}")
    return [t.data_ptr() for tensors in tensor_lists for t in tensors]


def adamw_step(
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    models: list[torch.Tensor | None],
    scalars: list[AdamWScalars],
) -> None:
    """Same contract as reference.adamw_step; one kernel launch per (device, grad dtype, model dtype)."""
    launches: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, g, model) in enumerate(zip(masters, grads, models)):
        launches[p.device, g.dtype, None if model is None else model.dtype].append(i)
    for (device, grad_dtype, model_dtype), idx in launches.items():
        grads_c = [grads[i].contiguous() for i in idx]  # kept alive until the kernel has run
        lists = [[masters[i] for i in idx], grads_c, [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]]
        if model_dtype is not None:
            lists.append([models[i] for i in idx])
        addrs = _on_device(_addresses(*lists), torch.int64, device)
        table = _on_device(
            [
                (1 - h.lr * h.weight_decay, h.beta1, h.beta2, h.eps, h.step_size, h.bias_correction2_sqrt)
                for h in (scalars[i] for i in idx)
            ],
            torch.float32,
            device,
        )
        block_tensor, block_start, numels = _block_table(tuple(masters[i].numel() for i in idx), device)
        _adamw_kernel[(len(block_tensor),)](
            block_tensor,
            block_start,
            numels,
            addrs,
            table,
            len(idx),
            GRAD_DTYPE=_TL_DTYPES[grad_dtype],
            MODEL_DTYPE=_TL_DTYPES[model_dtype or torch.float32],
            HAS_MODEL=model_dtype is not None,
            BLOCK=_BLOCK,
            num_warps=num_warps(_BLOCK),
        )
