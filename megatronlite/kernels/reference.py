"""Pure-torch versions of every op: the reference the fast paths are tested against, and the fallback.

These are the definitions, differentiated by autograd. The `torch` backend runs them, except
RMSNorm, whose hand-written backward in torch_fused.py saves passes over memory (same forward,
bit for bit). The cross-entropy pieces are the per-chunk steps of the fused linear +
cross-entropy (linear_cross_entropy.py); the AdamW step is torch.optim.AdamW's update, on fp32
master weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from megatronlite.kernels.linear_cross_entropy import ChunkOps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32; the normalized input is rounded to x's dtype before the weight scales it (as HF)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm in fp32, returned in x's dtype."""
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias, eps).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]: x*cos + rotate_half(x)*sin, rotate_half([a, b]) = [-b, a]."""
    a, b = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-b, a], dim=-1) * sin).to(x.dtype)


def swiglu(fused: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where the last dim of `fused` is [gate; up]."""
    return swiglu_halves(*fused.chunk(2, dim=-1))


def swiglu_halves(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from separate tensors (what the model runs without a fused kernel)."""
    return F.silu(gate) * up


def ce_stats(logits: torch.Tensor, target: torch.Tensor, n_valid: int) -> tuple[torch.Tensor, ...]:
    """Per row of an fp32 logits chunk: max and sum of exp(x - max) over the first `n_valid` columns
    (the rest are vocabulary padding), and the target's logit (0 where the target is -1: another rank's)."""
    rows = logits.shape[0]
    if n_valid == 0:  # this rank's whole shard is padding
        return logits.new_full((rows,), -math.inf), logits.new_zeros(rows), logits.new_zeros(rows)
    valid = logits[:, :n_valid]
    row_max = valid.max(dim=-1).values
    sum_exp = (valid - row_max[:, None]).exp().sum(dim=-1)
    owned = target >= 0
    picked = valid.gather(1, target.clamp(min=0)[:, None]).squeeze(1).masked_fill(~owned, 0.0)
    return row_max, sum_exp, picked


def ce_grad_(
    logits: torch.Tensor, target: torch.Tensor, n_valid: int, row_max: torch.Tensor, sum_exp: torch.Tensor
) -> None:
    """Overwrite logits with each row's d(loss)/d(logits): softmax minus the one-hot target, 0 on padding."""
    logits.sub_(row_max[:, None]).exp_().div_(sum_exp[:, None])
    logits[:, n_valid:] = 0.0
    owned = target >= 0
    logits.scatter_add_(1, target.clamp(min=0)[:, None], -owned[:, None].to(logits.dtype))


CE_CHUNK_OPS = ChunkOps(stats=ce_stats, grad_=ce_grad_)


class AdamWScalars(NamedTuple):
    """One tensor's hyperparameters for one step (its group's, and its own step count)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1 - self.beta2**self.step)


def adamw_step(
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    models: list[torch.Tensor | None],
    scalars: list[AdamWScalars],
) -> None:
    """torch.optim.AdamW's single-tensor update on fp32 masters; then copy into the model's tensor, if any."""
    for p, g, m, v, model, h in zip(masters, grads, exp_avgs, exp_avg_sqs, models, scalars):
        g = g.float()
        p.mul_(1 - h.lr * h.weight_decay)
        m.lerp_(g, 1 - h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        p.addcdiv_(m, (v.sqrt() / h.bias_correction2_sqrt).add_(h.eps), value=-h.step_size)
        if model is not None:
            model.copy_(p)
