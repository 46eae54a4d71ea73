"""SwiGLU, silu(gate) * up, in Triton on the fused [gate; up] projection output.

Reading gate and up from the fused tensor saves the two chunk copies, and the product is rounded
once (torch rounds silu(gate) and then the product). Backward recomputes silu from the saved
input instead of saving the activation, and writes both halves of the fused gradient in one pass.
"""

from __future__ import annotations

import torch

from megatronlite.kernels.triton_runtime import tl, triton


@triton.jit
def _swiglu_fwd(F, Y, stride_f, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(F + row * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(F + row * stride_f + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (gate * tl.sigmoid(gate) * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(F, DY, DF, stride_f, stride_dy, stride_df, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(F + row * stride_f + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(F + row * stride_f + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    df = DF + row * stride_df + cols
    tl.store(df, dgate.to(DF.dtype.element_ty), mask=mask)
    tl.store(df + n_cols, (dy * silu).to(DF.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(rows: int, cols: int) -> tuple[tuple[int, int], int]:
    block = min(triton.next_power_of_2(cols), 1024)
    return (rows, triton.cdiv(cols, block)), block


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused):
        f2 = _rows(fused)
        rows, cols = f2.shape[0], f2.shape[1] // 2
        y = torch.empty((rows, cols), dtype=fused.dtype, device=fused.device)
        grid, block = _grid(rows, cols)
        _swiglu_fwd[grid](f2, y, f2.stride(0), y.stride(0), cols, BLOCK=block)
        ctx.save_for_backward(f2)
        ctx.shape = fused.shape
        return y.view(fused.shape[:-1] + (cols,))

    @staticmethod
    def backward(ctx, dy):
        (f2,) = ctx.saved_tensors
        dy2 = _rows(dy)
        rows, cols = dy2.shape
        df = torch.empty_like(f2)
        grid, block = _grid(rows, cols)
        _swiglu_bwd[grid](f2, dy2, df, f2.stride(0), dy2.stride(0), df.stride(0), cols, BLOCK=block)
        return df.view(ctx.shape)


def swiglu(fused: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(fused)
