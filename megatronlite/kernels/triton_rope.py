"""Rotary embeddings (half rotation) in Triton, on q/k laid out [batch, heads, seq, head_dim].

With x = [a, b] split in halves, the op is linear: y = [a*cos1 - b*sin1, b*cos2 + a*sin2]. Its
gradient is the transposed map, dx = [g1*cos1 + g2*sin2, g2*cos2 - g1*sin1], which is the same
kernel with the two sine halves swapped and negated: one kernel serves both directions. The input
may be a strided view (q and k are transposed slices of the QKV projection); the output is
contiguous. Math is in fp32 and the result is rounded once to x's dtype.
"""

from __future__ import annotations

import torch

from megatronlite.kernels.triton_runtime import tl, triton


@triton.jit
def _rope(
    X,
    COS,
    SIN,
    Y,
    n_heads,
    seq_len,
    sxb,
    sxh,
    sxs,
    syb,
    syh,
    sys,
    stride_cs,
    HALF: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // n_heads, bh % n_heads
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (s < seq_len) & (d < HALF)
    x = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + s * sxs + d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    cs = s * stride_cs + d
    cos1 = tl.load(COS + cs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = -tl.load(SIN + cs, mask=mask, other=0.0).to(tl.float32)  # the sine paired with x2 in y1
    sin2 = tl.load(SIN + cs + HALF, mask=mask, other=0.0).to(tl.float32)  # paired with x1 in y2
    if TRANSPOSE:
        sin1, sin2 = sin2, sin1
    y = Y + b.to(tl.int64) * syb + h.to(tl.int64) * syh + s * sys + d
    tl.store(y, (x1 * cos1 + x2 * sin1).to(Y.dtype.element_ty), mask=mask)
    tl.store(y + HALF, (x2 * cos2 + x1 * sin2).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, heads, seq, dim = x.shape
    y = torch.empty((batch, heads, seq, dim), dtype=x.dtype, device=x.device)
    block_s = min(triton.next_power_of_2(seq), 16)
    _rope[(batch * heads, triton.cdiv(seq, block_s))](
        x,
        cos,
        sin,
        y,
        heads,
        seq,
        *x.stride()[:3],
        *y.stride()[:3],
        cos.stride(0),
        HALF=dim // 2,
        TRANSPOSE=transpose,
        BLOCK_S=block_s,
        BLOCK_D=triton.next_power_of_2(dim // 2),
    )
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, transpose=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos and sin [seq, head_dim], as models/gpt.py builds them."""
    cos, sin = (t.reshape(-1, t.shape[-1]).contiguous() for t in (cos, sin))
    return _Rotary.apply(x, cos, sin)
