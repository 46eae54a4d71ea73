"""Triton RMSNorm, LayerNorm, RoPE and SwiGLU against the pure-torch reference, forward and backward.

On a machine without a GPU the Triton cases run under Triton's interpreter (megatronlite.kernels
switches it on when CUDA is absent), on small shapes; with a GPU they run natively. Outputs are
allocated poisoned (NaN) so an element a kernel never writes fails.
"""

import pytest
import torch

from megatronlite.kernels import apply_rotary, layer_norm, rms_norm, swiglu
from megatronlite.kernels.dispatch import triton_problem
from megatronlite.kernels.testing import TOLERANCES, poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP = triton_problem(DEVICE)
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"triton cases skipped: {SKIP}")
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_()


def check(fn, args, dtype):
    """Run fn with impl triton (poisoned outputs) and torch; compare outputs and input gradients."""
    grad_inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref = fn(*args, impl="torch")
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, grad_inputs, grad_out)
    with poisoned_allocations():
        out = fn(*args, impl="triton")
        grads = torch.autograd.grad(out, grad_inputs, grad_out)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["weight-same", "weight-fp32"])
def test_rms_norm(dtype, weight_fp32):
    torch.manual_seed(0)
    x = randn(2, 5, 48, dtype=dtype)  # 48 columns: not a power of two, so the masks matter
    w = randn(48, dtype=torch.float32 if weight_fp32 else dtype, scale=0.5, shift=1.0)
    check(rms_norm, (x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(dtype, with_bias):
    torch.manual_seed(1)
    x = randn(3, 7, 40, dtype=dtype, shift=0.5)
    w = randn(40, dtype=dtype, scale=0.5, shift=1.0)
    b = randn(40, dtype=dtype) if with_bias else None
    check(layer_norm, (x, w, b, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_view(dtype):
    torch.manual_seed(2)
    # q as models/gpt.py makes it: [b, s, heads, d] from the QKV projection, transposed to [b, heads, s, d]
    x = randn(2, 9, 3, 16, dtype=dtype).transpose(1, 2)
    # arbitrary tables (halves differ), stricter than the real ones whose halves repeat
    cos, sin = torch.randn(9, 16, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    check(apply_rotary, (x, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    torch.manual_seed(3)
    check(swiglu, (randn(3, 5, 2 * 40, dtype=dtype, scale=2.0),), dtype)
