"""Fused kernels with pure-torch fallbacks, chosen per op; see dispatch.py. Never imports triton itself.

On a machine without CUDA, TRITON_INTERPRET=1 is set here (unless the user set it either way), so
`@triton.jit` kernels run on CPU tensors, slowly but faithfully: that is how CI tests them. Triton
reads the variable when it is imported and when a kernel is decorated, so it is set as early as
possible: megatronlite imports this package at its own import, before anything else can import
triton (transformers and torch.compile do).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ruff: noqa: E402

from megatronlite.kernels.dispatch import (
    BACKENDS,
    IMPLS,
    OPS,
    apply_rotary,
    fused_adamw,
    layer_norm,
    linear_cross_entropy,
    resolve,
    resolve_all,
    rms_norm,
    summary,
    swiglu,
)
from megatronlite.kernels.fused_adamw import FusedAdamW

__all__ = [
    "BACKENDS",
    "IMPLS",
    "OPS",
    "FusedAdamW",
    "apply_rotary",
    "fused_adamw",
    "layer_norm",
    "linear_cross_entropy",
    "resolve",
    "resolve_all",
    "rms_norm",
    "summary",
    "swiglu",
]
