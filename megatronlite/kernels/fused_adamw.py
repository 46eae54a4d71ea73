"""AdamW with fp32 master weights, stepping all tensors through one multi-tensor update function.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction, per-parameter step
counts, the same param_groups and hyperparameter names), so this is a drop-in replacement. What it
adds: a parameter held in bf16 or fp16 gets an fp32 master copy in its state ("master_param"),
the moments are always fp32, and the update function reads master, gradient and moments and writes
master, moments and the low-precision parameter in one pass. An fp32 parameter is its own master.
The update function is reference.adamw_step (torch) or triton_adamw.adamw_step; use
dispatch.fused_adamw to get the one matching an `impl` choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from megatronlite.kernels import reference

AdamWStep = Callable[..., None]  # the signature of reference.adamw_step
_STATE_FP32 = ("exp_avg", "exp_avg_sq", "master_param")


class FusedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        step_fn: AdamWStep = reference.adamw_step,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.step_fn = step_fn

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().float()
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masters, grads, exp_avgs, exp_avg_sqs, models, scalars = [], [], [], [], [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                low_precision = "master_param" in state
                masters.append(state["master_param"] if low_precision else p)
                models.append(p if low_precision else None)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                scalars.append(
                    reference.AdamWScalars(
                        group["lr"], beta1, beta2, group["eps"], group["weight_decay"], int(state["step"])
                    )
                )
        if masters:
            self.step_fn(masters, grads, exp_avgs, exp_avg_sqs, models, scalars)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating state to each parameter's dtype on load; the moments and master stay fp32."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            for key in _STATE_FP32:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)
