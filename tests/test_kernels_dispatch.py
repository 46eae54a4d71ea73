"""Choosing kernel implementations: auto, explicit choices, clear errors, and life without triton."""

import importlib.util
import subprocess
import sys

import pytest

from megatronlite.errors import UserError
from megatronlite.kernels import (
    OPS,
    dispatch,
    external,
    resolve,
    resolve_all,
    summary,
)


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
    assert "megatronlite[triton]" in str(e), e
x, w = torch.randn(2, 8), torch.randn(8)
torch.testing.assert_close(k.rms_norm(x, w, 1e-5), w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
assert "triton" not in sys.modules or sys.modules["triton"] is None
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_interpreter_too_old_for_the_kernels_is_named(monkeypatch):
    """Triton 3.6's CPU interpreter fails on loops bounded by a runtime value (torch 2.11's triton): not chosen,
    and the tests that need it skip with the reason, rather than fail inside triton."""
    monkeypatch.setattr(dispatch, "_triton_version", lambda: "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU interpreter is asked for on a GPU machine too
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    problem = dispatch.triton_problem("cpu")
    assert problem is not None and "triton 3.6.0's CPU interpreter" in problem and ">= 3.9" in problem
