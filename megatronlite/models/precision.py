"""The compute dtype of mixed precision: weights and Adam stay fp32, activations run in autocast's dtype.

Under bf16/fp16 the residual stream, the norms' outputs and so every tensor that TP/SP collectives and pipeline
sends move are in the compute dtype (Megatron's bytes), while norms compute their statistics in fp32 inside.
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on for `x`'s device, else `x`'s own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x))
