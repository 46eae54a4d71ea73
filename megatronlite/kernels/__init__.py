"""Fused kernels with pure-torch fallbacks, chosen per op; see dispatch.py. Never imports triton itself."""

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
