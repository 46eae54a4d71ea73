"""The torch backend's hand-written RMSNorm against autograd on the reference formula."""

import pytest
import torch

from megatronlite.kernels import reference, torch_fused
from megatronlite.kernels.testing import TOLERANCES


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_rms_norm_matches_reference(dtype, weight_dtype):
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 48) * 3 + 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(48) * 0.5 + 1).to(weight_dtype).requires_grad_()
    grad = torch.randn(3, 5, 48)
    ref = reference.rms_norm(x, weight, 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, weight), grad.to(ref.dtype))
    out = torch_fused.rms_norm(x, weight, 1e-5)
    grads = torch.autograd.grad(out, (x, weight), grad.to(out.dtype))
    assert out.dtype == ref.dtype and torch.equal(out, ref)  # the forward is the reference's, bit for bit
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])
