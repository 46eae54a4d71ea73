"""Every Triton kernel compiles natively (PTX and cubin for an H100, sm_90) even on a machine without a GPU.

The interpreter that runs the kernel tests on CPU accepts some code the real compiler rejects, so
this compiles each kernel ahead of time in a fresh process with the interpreter off (Triton ships
ptxas; no driver is needed). Signatures use the dtypes the wrappers launch with.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatronlite.kernels import triton_adamw, triton_cross_entropy, triton_norm, triton_rope, triton_swiglu

    def compile_(fn, pointers, ints, floats=(), **constexprs):
        sig = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32"),
               **dict.fromkeys(constexprs, "constexpr")}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

    for x in ("*fp32", "*bf16"):
        for rms in (True, False):
            compile_(triton_norm._norm_fwd, {"X": x, "W": "*fp32", "B": "*fp32", "Y": x, "MEAN": "*fp32",
                     "RSTD": "*fp32"}, ("stride_x", "stride_y", "n_cols"), ("eps",), RMS=rms, HAS_BIAS=not rms,
                     BLOCK=4096)
            compile_(triton_norm._norm_bwd, {"DY": x, "X": x, "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                     "DX": x, "DW": "*fp32", "DB": "*fp32"}, ("stride_dy", "stride_x", "stride_dx", "n_rows",
                     "n_cols", "rows_per_program"), RMS=rms, HAS_BIAS=not rms, BLOCK=4096)
        for transpose in (False, True):
            compile_(triton_rope._rope, {"X": x, "COS": "*fp32", "SIN": "*fp32", "Y": x}, ("n_heads", "seq_len",
                     "sxb", "sxh", "sxs", "syb", "syh", "sys", "stride_cs"), HALF=64, TRANSPOSE=transpose,
                     BLOCK_S=16, BLOCK_D=64)
        compile_(triton_swiglu._swiglu_fwd, {"F": x, "Y": x}, ("stride_f", "stride_y", "n_cols"), BLOCK=1024)
        compile_(triton_swiglu._swiglu_bwd, {"F": x, "DY": x, "DF": x}, ("stride_f", "stride_dy", "stride_df",
                 "n_cols"), BLOCK=1024)
    rows = {"LOGITS": "*fp32", "TARGET": "*i64", "MAX": "*fp32", "SUM": "*fp32"}
    compile_(triton_cross_entropy._stats_kernel, {**rows, "PICKED": "*fp32"}, ("stride", "n_valid"), BLOCK=4096)
    compile_(triton_cross_entropy._grad_kernel, rows, ("stride", "n_cols", "n_valid"), BLOCK=4096)
    for grad, model in ((tl.float32, None), (tl.bfloat16, tl.bfloat16), (tl.float16, tl.float16)):
        compile_(triton_adamw._adamw_kernel, {"BLOCK_TENSOR": "*i32", "BLOCK_START": "*i64", "NUMEL": "*i64",
                 "ADDRS": "*i64", "SCALARS": "*fp32"}, ("n_tensors",), GRAD_DTYPE=grad,
                 MODEL_DTYPE=model or tl.float32, HAS_MODEL=model is not None, BLOCK=4096)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton cases skipped: triton is not installed")
def test_kernels_compile_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
