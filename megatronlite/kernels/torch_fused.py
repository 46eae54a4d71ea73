"""Pure-torch ops with a hand-written backward: the `torch` backend where autograd's is wasteful.

SwiGLU: autograd's backward of the reference concatenates the gradients of the gate and up halves
(a `cat` as large as the MLP's widest activation); here both halves are written once into one
buffer. It saves what autograd saves (the input and silu(gate)). The numbers are bit for bit the
reference's (tests/test_kernels_torch.py checks it). That matters where no Triton kernel runs (CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused: torch.Tensor) -> torch.Tensor:
        gate, up = fused.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(fused, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fused, activated = ctx.saved_tensors
        gate, up = fused.chunk(2, dim=-1)
        out = torch.empty_like(fused)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, activated, out=d_up)
        return out


def swiglu(fused: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where the last dim of `fused` is [gate; up]."""
    return _SwiGLU.apply(fused)
