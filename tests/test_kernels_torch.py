"""The torch backend's hand-written SwiGLU against autograd on the reference formula: bit for bit."""

import pytest
import torch

from megatronlite.kernels import reference, torch_fused
from megatronlite.kernels.testing import poisoned_allocations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_swiglu_matches_reference_bitwise(dtype, transposed):
    torch.manual_seed(0)
    fused = (torch.randn(6, 4, 2 * 40) * 2).to(dtype)
    if transposed:  # rows not contiguous with each other
        fused = fused.transpose(0, 1)
    fused.requires_grad_()
    grad = torch.randn(fused.shape[:-1] + (40,)).to(dtype)
    ref = reference.swiglu(fused)
    (ref_grad,) = torch.autograd.grad(ref, fused, grad)
    with poisoned_allocations():  # an unwritten half of the gradient stays NaN and fails
        out = torch_fused.swiglu(fused)
        (out_grad,) = torch.autograd.grad(out, fused, grad)
    assert out.dtype == dtype and out_grad.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(out_grad, ref_grad)
