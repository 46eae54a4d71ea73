"""Optimizer CPU offload: Adam's moments in CPU memory and the step on the CPU.

Weights are fp32 on the device (bf16 runs use autocast), so they are their own master copy:
each step copies weights and gradients to the CPU, runs torch's fused CPU AdamW there, and
copies the weights back. It saves 8 bytes per parameter of accelerator memory (the two
moments). It is a torch Optimizer over the model's own parameters, so the trainer, clipping
and checkpoints see the usual `param_groups` and `state[p]` (whose tensors are on the CPU).
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw


class OffloadAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    def init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            states = [self.init_state(p) for p in live]
            masters = [p.detach().to("cpu", torch.float32, copy=True) for p in live]
            grads = [p.grad.to("cpu", torch.float32) for p in live]
            beta1, beta2 = group["betas"]
            adamw(
                masters,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                fused=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
            for p, master in zip(live, masters):
                p.copy_(master, non_blocking=True)
