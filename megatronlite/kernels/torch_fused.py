"""Pure-torch ops with a hand-written backward: the `torch` backend where autograd's is wasteful.

That matters where no Triton kernel runs (CPU). The forwards are bit for bit the reference's
(tests/test_kernels_torch.py checks it, and the backwards against autograd's).

RMSNorm: autograd differentiates pow, mean, rsqrt and two products one by one; the closed form
dx = rstd * (g - x_hat * mean(g * x_hat)) takes about half the passes over the activations and
saves only x and rstd. Its gradients differ from autograd's by rounding only.
"""

from __future__ import annotations

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd
        d_weight = d_x = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * x_hat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(x.dtype).float()  # the gradient reaching x_hat, as autograd rounds it
            d_x = (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return d_x, d_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 over the last dim, as reference.rms_norm."""
    return _RMSNorm.apply(x, weight, eps)
