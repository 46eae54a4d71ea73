"""NVIDIA apex and Transformer Engine ops, used only when installed and selected.

Both libraries ship their norms as modules owning their weights; our models own theirs (TP
sharded, checkpointed by name), so one cached module per shape is called with our tensors in
place of its parameters (torch.func.functional_call), and gradients flow to ours. Neither library
is on PyPI (PyPI's `apex` is an unrelated package): they come with NVIDIA's PyTorch container.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch.func import functional_call

# what each backend must provide: module path -> attribute names
_NEEDS = {
    "apex": {"apex.normalization": ("FusedRMSNorm", "FusedLayerNorm"), "apex.optimizers": ("FusedAdam",)},
    "te": {"transformer_engine.pytorch": ("RMSNorm", "LayerNorm")},
}


@functools.cache
def available(backend: str) -> bool:
    """Whether `backend` (apex | te) imports and has what we use."""
    try:
        return all(
            all(hasattr(importlib.import_module(mod), name) for name in names) for mod, names in _NEEDS[backend].items()
        )
    except ImportError:
        return False


@functools.cache
def _norm_module(backend: str, kind: str, hidden: int, eps: float, device: torch.device) -> torch.nn.Module:
    if backend == "apex":
        cls = getattr(importlib.import_module("apex.normalization"), f"Fused{kind}")
        return cls(hidden, eps=eps).to(device)
    cls = getattr(importlib.import_module("transformer_engine.pytorch"), kind)
    return cls(hidden, eps=eps, device=device)


def _norm(backend: str, kind: str, x: torch.Tensor, params: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    module = _norm_module(backend, kind, x.shape[-1], eps, x.device)
    return functional_call(module, params, (x,))


def apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm("apex", "RMSNorm", x, {"weight": weight}, eps)


def apex_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm("apex", "LayerNorm", x, {"weight": weight, "bias": _bias(weight, bias)}, eps)


def te_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm("te", "RMSNorm", x, {"weight": weight}, eps)


def te_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm("te", "LayerNorm", x, {"weight": weight, "bias": _bias(weight, bias)}, eps)


def _bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(weight) if bias is None else bias


def apex_adamw(
    params: Iterable[Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    """apex's FusedAdam in AdamW mode; it steps parameters in their own dtype (keep them fp32)."""
    fused_adam = importlib.import_module("apex.optimizers").FusedAdam
    return fused_adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
