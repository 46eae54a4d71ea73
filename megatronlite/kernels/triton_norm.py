"""RMSNorm and LayerNorm in Triton: one program per row forward; backward loops over rows per program.

Both norms share the kernels (a constexpr picks RMS or LayerNorm) because they differ only in
centering and bias. Statistics are fp32 whatever the input dtype. Backward accumulates each
program's weight (and bias) gradient in fp32 registers and writes one partial row per program,
summed by torch afterwards: no atomics, so results are deterministic.
"""

from __future__ import annotations

import torch

from megatronlite.kernels.triton_runtime import grid_size, num_warps, tl, triton


@triton.jit
def _norm_fwd(
    X,
    W,
    B,
    Y,
    MEAN,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    xhat = xc * rstd
    w = tl.load(W + cols, mask=mask).to(tl.float32)
    if RMS:  # rounded to the input dtype before the weight, as the reference does
        y = xhat.to(X.dtype.element_ty).to(tl.float32) * w
    else:
        y = xhat * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW,
    DB,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        wdy = w * dy
        dx = wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols)
        if RMS:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        else:
            dx -= tl.sum(wdy, axis=0) / n_cols
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
        tl.store(DX + row * stride_dx + cols, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, db, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x2 = _rows(x)
        rows, cols = x2.shape
        out_dtype = torch.result_type(x, weight) if rms else x.dtype
        y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        mean = rstd if rms else torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        _norm_fwd[(rows,)](
            x2,
            weight,
            bias if bias is not None else weight,
            y,
            mean,
            rstd,
            x2.stride(0),
            y.stride(0),
            cols,
            eps,
            RMS=rms,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=num_warps(block),
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.block, ctx.x_shape = rms, bias is not None, block, x.shape
        return y.view(x.shape[:-1] + (cols,))

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        rows, cols = x2.shape
        programs = grid_size(x2.device, rows)
        dx = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
        dw = torch.empty((programs, cols), dtype=torch.float32, device=x2.device)
        db = torch.empty((programs, cols), dtype=torch.float32, device=x2.device) if ctx.has_bias else dw
        _norm_bwd[(programs,)](
            dy2,
            x2,
            weight,
            mean,
            rstd,
            dx,
            dw,
            db,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            rows,
            cols,
            triton.cdiv(rows, programs),
            RMS=ctx.rms,
            HAS_BIAS=ctx.has_bias,
            BLOCK=ctx.block,
            num_warps=num_warps(ctx.block),
        )
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.x_shape), dw.sum(0).to(weight.dtype), dbias, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _Norm.apply(x, weight, bias, eps, False)
