"""Cross-entropy over vocabulary-sharded logits, without ever gathering the full vocabulary.

Each TP rank holds the logits of its vocabulary slice. The softmax needs only two scalars per
token from the other ranks (the max and the sum of exponentials) and the target's logit, which
lives on exactly one rank. Padded vocabulary columns (ids >= the real vocab size) are masked out,
so the loss does not depend on the padding, which itself depends on the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatronlite.parallel.mesh import Mesh


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, mesh: Mesh) -> torch.Tensor:
    if mesh.tp > 1:
        dist.all_reduce(x, op=op, group=mesh.tp_group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, mesh):
        ctx.dtype = logits.dtype
        logits = logits.float()
        per_rank = logits.shape[-1]
        start = mesh.tp_rank * per_rank
        if start + per_rank > vocab_size:  # this shard holds padding columns
            cols = torch.arange(start, start + per_rank, device=logits.device)
            logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
        logits_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, mesh)
        shifted = logits - logits_max.unsqueeze(-1)
        local_target = target - start
        mine = (local_target >= 0) & (local_target < per_rank)
        local_target = local_target.masked_fill(~mine, 0)
        picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        picked = _all_reduce(picked, dist.ReduceOp.SUM, mesh)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, mesh)
        loss = sum_exp.log() - picked
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, mine)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, mine = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, mesh: Mesh
) -> torch.Tensor:
    """Per-token loss [batch, seq] from this rank's logits [batch, seq, padded_vocab / TP].

    Without TP the vocabulary is whole: torch's cross-entropy over the real (unpadded) columns,
    the same loss in fewer passes over the logits.
    """
    if mesh.tp == 1:
        real = logits[..., :vocab_size].float()
        return F.cross_entropy(real.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, mesh)
