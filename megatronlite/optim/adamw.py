"""AdamW over this rank's parameters, in the implementation `optim.impl` names.

auto: torch's fused kernel where the device has it (it is, on CPU and CUDA), else foreach.
torch: torch's foreach implementation. fused: torch's fused kernel. triton / apex: the fused
multi-tensor steps of megatronlite.kernels. With `optim.offload`, Adam states and fp32 master
the step runs on the CPU with Adam's moments in CPU memory (see offload.py).
"""

from __future__ import annotations

import torch

from megatronlite import kernels
from megatronlite.config import OptimConfig
from megatronlite.errors import UserError
from megatronlite.optim.offload import OffloadAdamW


def param_groups(params: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norms and biases.

    Decided from the global shape, so a ZeRO-1 slice (flat) decays as the parameter it was cut from.
    """
    decay = [p for p in params.values() if len(p.sharding.global_shape) >= 2]
    no_decay = [p for p in params.values() if len(p.sharding.global_shape) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    params: dict[str, torch.nn.Parameter], cfg: OptimConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and a description of the implementation chosen (printed at start-up)."""
    groups = param_groups(params, cfg.weight_decay)
    hyper = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.offload_to == "cpu":
        if cfg.impl not in ("auto", "torch", "fused"):
            raise UserError(f"optim.offload steps on the CPU with torch's AdamW; optim.impl {cfg.impl!r} cannot")
        return OffloadAdamW(groups, **hyper), "AdamW offloaded to the CPU (torch fused, moments in CPU memory)"
    impl = cfg.impl
    if impl in ("triton", "apex"):
        return kernels.fused_adamw(groups, impl=impl, **hyper), f"megatronlite.kernels AdamW ({impl})"
    if impl == "auto":
        impl = "fused" if fused_supported(device) else "torch"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
    return torch.optim.AdamW(
        groups, **hyper, **kwargs
    ), f"torch.optim.AdamW({'fused' if impl == 'fused' else 'foreach'})"


def fused_supported(device: torch.device) -> bool:
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=device))
        probe.grad = torch.zeros_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False
