"""Choosing kernel implementations: auto, explicit choices, clear errors, and life without triton."""

import subprocess
import sys

import pytest
import torch

from megatronlite.config import ModelConfig
from megatronlite.errors import UserError
from megatronlite.kernels import (
    OPS,
    apply_rotary,
    external,
    layer_norm,
    resolve,
    resolve_all,
    rms_norm,
    summary,
    swiglu,
)
from megatronlite.models import gpt


def test_auto_is_torch_on_cpu():
    assert resolve_all("auto", "cpu") == dict.fromkeys(OPS, "torch")
    assert summary("auto", "cpu") == "kernels on cpu: " + " ".join(f"{op}=torch" for op in OPS)


def test_per_op_choices_default_to_auto():
    assert resolve_all({"swiglu": "torch"}, "cpu")["rms_norm"] == "torch"


@pytest.mark.parametrize(
    ("op", "impl", "message"),
    [
        ("swiglu", "fast", "unknown implementation; valid: auto, torch, triton, apex, te"),
        ("swiglu", "te", "te has no swiglu here; valid: auto, torch, triton"),
        ("adamw", "te", "te has no adamw here; valid: auto, torch, triton, apex"),
        ("softmax", "auto", "unknown kernel op 'softmax'"),
    ],
)
def test_bad_choices_name_the_valid_ones(op, impl, message):
    with pytest.raises(UserError, match=message):
        resolve(op, impl, "cpu")


@pytest.mark.parametrize(("backend", "name"), [("apex", "NVIDIA apex"), ("te", "Transformer Engine")])
def test_missing_apex_or_te_is_a_user_error(backend, name):
    if external.available(backend):
        pytest.skip(f"{backend} is installed here")
    for op in ("rms_norm", "layer_norm"):
        with pytest.raises(UserError, match=f"kernel {op}='{backend}': {name} is not installed"):
            resolve(op, backend, "cuda")
    with pytest.raises(UserError, match="unknown kernel op"):
        resolve_all({"rms_norm": "torch", "nrom": backend})


def test_works_without_triton():
    """Blocks `import triton` in a fresh interpreter: the package imports, auto is torch, triton is refused."""
    code = """
import sys
sys.modules["triton"] = None
import torch
import megatronlite.kernels as k
from megatronlite.errors import UserError
assert set(k.resolve_all("auto", "cuda").values()) == {"torch"}
try:
    k.resolve("rms_norm", "triton", "cpu")
    raise SystemExit("triton was accepted")
except UserError as e:
    assert "pip install triton" in str(e), e
x, w = torch.randn(2, 8), torch.randn(8)
torch.testing.assert_close(k.rms_norm(x, w, 1e-5), w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
assert "triton" not in sys.modules or sys.modules["triton"] is None
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_is_the_model_code(dtype):
    """Choosing `torch` must not change a model's numbers: the references equal models/gpt.py bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16).to(dtype)
    for arch, op in (("llama", rms_norm), ("gpt2", layer_norm)):
        norm = gpt.Norm(ModelConfig(arch=arch, hidden_size=16, num_heads=2), sequence_parallel=False)
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_()
        args = (norm.weight, norm.eps) if arch == "llama" else (norm.weight, norm.bias, norm.eps)
        assert torch.equal(op(x, *args, impl="torch"), norm(x))
    q = torch.randn(2, 3, 5, 16).to(dtype)
    cos, sin = gpt.rotary_tables(16, 5, 10000.0, q.device)
    assert torch.equal(apply_rotary(q, cos, sin, impl="torch"), gpt.apply_rotary(q, cos, sin))
    fused = torch.randn(2, 5, 32).to(dtype)
    gate, up = fused.chunk(2, dim=-1)
    assert torch.equal(swiglu(fused, impl="torch"), torch.nn.functional.silu(gate) * up)
