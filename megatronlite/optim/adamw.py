"""AdamW over this rank's parameters: torch's fused kernel where the device has it."""

from __future__ import annotations

import torch

from megatronlite.config import OptimConfig


def param_groups(params: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norms and biases.

    A ZeRO-1 slice is flat; `full_ndim` is the rank of the parameter it was cut from.
    """
    decay = [p for p in params.values() if getattr(p, "full_ndim", p.ndim) >= 2]
    no_decay = [p for p in params.values() if getattr(p, "full_ndim", p.ndim) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(params: dict[str, torch.nn.Parameter], cfg: OptimConfig) -> tuple[torch.optim.AdamW, str]:
    """The optimizer and the name of the implementation chosen (printed at start-up)."""
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if _fused_supported(params) else "torch"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(
        param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
    )
    return opt, f"torch.optim.AdamW({'fused' if impl == 'fused' else 'foreach'})"


def _fused_supported(params: dict[str, torch.nn.Parameter]) -> bool:
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=next(iter(params.values())).device))
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False
