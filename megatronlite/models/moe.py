"""A mixture-of-experts layer in place of the MLP: a router picks each token's top-k experts, every expert is
an MLP, the token's output is the experts' outputs weighted by the router (plus an optional shared expert).

Routing. The router is a linear map to one logit per expert, in fp32. Softmax scores (Mixtral, Qwen-MoE) or
sigmoid scores (DeepSeek-V3) choose the top k; with a selection bias (aux-loss-free balancing) the bias moves
the choice but not the weights. The chosen scores, renormalised to sum to one where configured and times
`scaling_factor`, weight the experts' outputs.

Dispatch (dropless by default). The (token, expert) assignments are sorted by expert, stably, so each expert's
tokens are one contiguous block in token order; each projection is then one grouped GEMM over the blocks
(`torch._grouped_mm` on GPUs that have it, for sizes it takes; one GEMM per expert otherwise), and the outputs,
times their weights, are added back at their tokens. With expert parallelism (`parallel.expert`) the sender sorts:
its sorted rows are already grouped by destination rank, so one all-to-all (after one of the per-expert counts)
delivers them; the receiver permutes what it got from all senders into per-expert blocks, runs its experts,
permutes back, and a second all-to-all returns each output row to its token's rank, where it is weighted and added
as above. With a capacity factor an expert takes at most ceil(factor x assignments / experts) assignments, the
earliest tokens first; the rest are dropped (their weight is lost) and counted. Under context or sequence
parallelism a micro-batch's tokens are spread over ranks: they share their (token, expert) choices (a few integers
per token) and decide over the whole micro-batch, in its token order, so every layout drops what one process drops.

Losses. The load-balancing loss (Switch Transformer / GShard form, as Megatron computes it) is
coeff x E x sum_e (mean router probability of e) x (share of assignments to e). Each rank's mean probabilities
are its tokens' (CP and DP ranks' losses average as their main losses do, TP ranks' gradients add up, so each
takes 1/TP). The shares (`aux_loss_scope`): micro_batch, the micro-batch's over its whole sequences (summed
over the CP and sequence-parallel ranks); global, as Megatron's global_aux_loss, the micro-batch's summed over
every DP x CP rank too and averaged with the step's earlier micro-batches' (a running mean: a micro-batch's
backward cannot wait for later ones). Full recompute's second forward reuses the shares its first forward used
(queued per layer: each layer recomputes its micro-batches in the order it ran them). The z-loss
is coeff x mean(logsumexp(logits)^2). Both
reach the backward through `AuxLosses`: the layer's output passes through
unchanged and the losses get the gradient the main loss has per micro-batch (`set_aux_loss_scale`), so they
need no path of their own through the pipeline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatronlite.config import ModelConfig
from megatronlite.models.precision import compute_dtype
from megatronlite.parallel.context import local_positions
from megatronlite.parallel.mappings import all_to_all
from megatronlite.parallel.sharding import empty_param, expert_split, replicated

_AUX_LOSS_SCALE = [1.0]  # the gradient one micro-batch's loss gets: 1 / micro-batches (x fp16's loss scale)
_UNCOUNTED = [False]  # inside a forward that is not a training step's: routing runs, statistics must not


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Forwards whose routing is not counted: full recompute's second forward (torch.utils.checkpoint's
    context_fn) and the pipeline's shape inference, which runs a stage on placeholder values."""
    before, _UNCOUNTED[0] = _UNCOUNTED[0], True
    try:
        yield
    finally:
        _UNCOUNTED[0] = before


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), uncounted()


def set_aux_loss_scale(scale: float) -> None:
    """Called by the trainer before each step: the factor its micro-batch losses are multiplied by."""
    _AUX_LOSS_SCALE[0] = scale


class AuxLosses(torch.autograd.Function):
    """Identity on `x`; in backward, the auxiliary loss gets the micro-batch loss's gradient scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, _AUX_LOSS_SCALE[0])


@dataclasses.dataclass
class RouterStats:
    """What the layer saw since the last `take_stats`, summed over forwards (for metrics and the bias update)."""

    tokens_per_expert: torch.Tensor  # [E] assignments kept
    aux_loss: torch.Tensor  # sums of the losses' values (before their coefficients)
    z_loss: torch.Tensor
    dropped: torch.Tensor  # assignments over capacity
    forwards: int = 0


def route(
    logits: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen experts [T, k], their weights [T, k], every expert's score [T, E]; fp32) from the router's fp32
    logits [T, E]."""
    moe = cfg.moe
    scores = logits.softmax(-1) if moe.router == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    experts = choice.topk(moe.top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if moe.normalize_top_k:
        weights = weights / weights.sum(-1, keepdim=True)
    return experts, weights * moe.scaling_factor, scores


def capacity_keep(sorted_experts: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """For assignments sorted by expert: whether each is within its expert's first `capacity`."""
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(sorted_experts.numel(), device=sorted_experts.device) - starts[sorted_experts]
    return position < capacity


def shared_capacity_keep(
    experts: torch.Tensor, token_index: torch.Tensor, tokens: int, groups: list, capacity: int
) -> torch.Tensor:
    """For this rank's assignments [T, k] in flat order: whether each is among its expert's first `capacity` of all
    `groups`' ranks' assignments, ordered as one process orders them (token, then choice; `token_index`: each local
    token's index among the micro-batch's `tokens`). No host sync: all on the device."""
    k = experts.shape[1]
    keys = token_index.unsqueeze(1) * k + torch.arange(k, device=experts.device)  # place in one process's order
    every_expert, every_key = _gathered(experts, groups), _gathered(keys, groups)
    span = tokens * k  # more than every key: (expert, key) pairs sort by expert, then key
    ordered = (every_expert * span + every_key).flatten().sort().values
    mine = experts * span + keys
    earlier = torch.searchsorted(ordered, mine) - torch.searchsorted(ordered, experts * span)  # same expert, before
    return earlier < capacity


def has_grouped_mm(x: torch.Tensor) -> bool:
    """Whether the device has one grouped GEMM for x's dtype (CUDA, bf16)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_mm_takes(weights: Iterable[torch.Tensor]) -> bool:
    """Whether torch._grouped_mm takes these [E, out, in] expert weights (and rows as wide as their inputs): it
    reads by 16-byte-aligned strides and addresses, so every size it multiplies is a multiple of 16 bytes and each
    weight starts on a 16-byte boundary (a view into a flat buffer may not)."""
    return all(
        (w.shape[-1] * w.element_size()) % 16 == 0
        and (w.shape[-2] * w.element_size()) % 16 == 0
        and w.data_ptr() % 16 == 0
        for w in weights
    )


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, blocks: list[int] | torch.Tensor) -> torch.Tensor:
    """x [N, in] in blocks of rows, block e times weight[e]^T ([E, out, in]). `blocks`: the int32 cumulative row
    offsets on the device for one grouped GEMM (`has_grouped_mm`; nothing read on the host), else the rows per
    expert as host ints, one GEMM each."""
    if isinstance(blocks, torch.Tensor):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=blocks)
    out = [block @ w.t() for block, w in zip(x.split(blocks), weight)]
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[1])


class SharedExpert(nn.Module):
    """A dense MLP every token goes through, optionally scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, cfg: ModelConfig, mesh, sequence_parallel: bool, backends) -> None:
        super().__init__()
        from megatronlite.models.gpt import MLP  # the dense MLP, whose module imports this one

        shared = dataclasses.replace(cfg, ffn_hidden_size=cfg.moe.shared_expert_ffn_hidden_size)
        self.mlp = MLP(shared, mesh, sequence_parallel, backends)
        h, sp = cfg.hidden_size, sequence_parallel and mesh.tp > 1
        self.gate = empty_param((1, h), replicated((1, h), partial_over_tp=sp)) if cfg.moe.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y if self.gate is None else y * torch.sigmoid(F.linear(x, self.gate))


class MoE(nn.Module):
    """The experts of one layer; with expert parallelism this rank holds a block of them (TP 1)."""

    def __init__(self, cfg: ModelConfig, mesh, sequence_parallel: bool, backends) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep = mesh.role("expert")  # the ranks splitting the experts, exchanging tokens all-to-all
        # the ranks holding one sequence's tokens: CP's, and under sequence parallelism TP's (without it every TP
        # rank routes the same tokens through the same experts: their gradients are whole on each)
        sp = sequence_parallel and mesh.tp > 1
        self.context, self.sp = mesh.role("context"), mesh.role("tensor") if sp else None
        self.sequence = [g for g in (self.context, self.sp) if g and g.size > 1]
        # the ranks of one micro-batch of the global batch: DP x CP's, and TP's under sequence parallelism
        self.batch = [g for g in (mesh.role("grad"), mesh.role("tensor") if sp else None) if g and g.size > 1]
        # global scope: the step's assignments so far, and the shares each counted forward used (for recompute)
        self.step_counts: torch.Tensor | None = None
        self.step_shares: collections.deque[torch.Tensor] = collections.deque()
        self.tp_shards_tokens = mesh.tp if sp else 1
        moe, h, f = cfg.moe, cfg.hidden_size, cfg.expert_ffn_size
        e = moe.num_experts
        self.router = empty_param((e, h), replicated((e, h), partial_over_tp=sp))
        names = ("gate", "up", "down") if cfg.gated else ("fc1", "fc2")
        for name in names:
            shape = (e, h, f) if name in ("down", "fc2") else (e, f, h)
            init = "scaled_normal" if name in ("down", "fc2") else "normal"
            local = (e // self.ep.size, *shape[1:])
            setattr(self, name, empty_param(local, expert_split(shape, init, partial_over_tp=sp)))
        shared = moe.shared_expert_ffn_hidden_size
        self.shared = SharedExpert(cfg, mesh, sequence_parallel, backends) if shared else None
        self.register_buffer("bias", torch.zeros(e) if moe.bias_update_rate else None)
        self.stats: RouterStats | None = None

    def experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, in blocks of `counts` rows, through this rank's experts; in autocast's dtype when
        it is on, each stacked weight cast once (autocast would cast every expert's slice on its own, and keep each
        for backward)."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        names = ("gate", "up", "down") if self.cfg.gated else ("fc1", "fc2")
        w = {name: getattr(self, name).to(dtype) for name in names}
        grouped = has_grouped_mm(x) and grouped_mm_takes(w.values())
        blocks = torch.cumsum(counts, 0).to(torch.int32) if grouped else counts.tolist()

        def linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return grouped_linear(rows, weight, blocks)

        if self.cfg.gated:
            return linear(F.silu(linear(x, w["gate"])) * linear(x, w["up"]), w["down"])
        return linear(F.gelu(linear(x, w["fc1"]), approximate="tanh"), w["fc2"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.cfg.moe
        tokens = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # the router in fp32, under bf16/fp16 autocast too
            logits = F.linear(tokens.float(), self.router.float())
        experts, weights, scores = route(logits, self.cfg, self.bias)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        sorted_experts = flat[order]
        counts = routed = torch.bincount(flat, minlength=moe.num_experts)
        keep = None
        if moe.capacity_factor is not None:
            batch_tokens = experts.shape[0] * math.prod(g.size for g in self.sequence)  # over the ranks sharing it
            capacity = math.ceil(moe.capacity_factor * (batch_tokens * moe.top_k) / moe.num_experts)
            if self.sequence:
                index = self._token_index(x)
                keep = shared_capacity_keep(experts, index, batch_tokens, self.sequence, capacity).flatten()[order]
            else:
                keep = capacity_keep(sorted_experts, counts, capacity)
            order, sorted_experts = order[keep], sorted_experts[keep]
            counts = torch.bincount(sorted_experts, minlength=moe.num_experts)
        token_of = order // moe.top_k
        dispatched = tokens[token_of]
        y = self._exchanged(dispatched, counts) if self.ep.size > 1 else self.experts(dispatched, counts)
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(tokens, dtype=y.dtype).index_add_(0, token_of, y).to(x.dtype).reshape(x.shape)
        if self.shared is not None:
            out = out + self.shared(x)
        aux = self._losses(logits, scores, routed, counts, keep) if torch.is_grad_enabled() else None
        return AuxLosses.apply(out, aux) if aux is not None else out

    def _token_index(self, x: torch.Tensor) -> torch.Tensor:
        """Each of this rank's tokens' index among its micro-batch's [b, s] tokens: rows of its CP chunks' positions
        (context.local_positions), and under SP this TP rank's block of those (mappings.sequence_shard's)."""
        b, sp_size = x.shape[0], self.sp.size if self.sp else 1
        local_len = x.shape[:-1].numel() * sp_size // b  # the CP rank's sequence length
        positions = local_positions(local_len, self.context.rank, self.context.size, x.device)
        index = (torch.arange(b, device=x.device).unsqueeze(1) * (local_len * self.context.size) + positions).flatten()
        return index.chunk(sp_size)[self.sp.rank] if self.sp else index

    def _exchanged(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: rows sorted by (global) expert go to the EP rank holding their expert, all-to-all
        (the counts exchanged first); each rank runs its experts on what it received, grouped by expert across
        senders, and the outputs return to their senders in the order they were sent."""
        size, pg = self.ep.size, self.ep.pg
        local = self.cfg.moe.num_experts // size
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=pg)  # [sender, local expert]: what each sends us
        received = received.view(size, local)
        sent, got = counts.view(size, local).sum(1).tolist(), received.sum(1).tolist()
        rows = all_to_all(x, got, sent, pg)  # by sender, then by expert within each sender
        expert_of = torch.arange(local, device=x.device).repeat(size).repeat_interleave(received.reshape(-1))
        by_expert = expert_of.argsort(stable=True)  # by expert, then by sender
        y = torch.empty_like(rows).index_copy(0, by_expert, self.experts(rows[by_expert], received.sum(0)))
        return all_to_all(y, sent, got, pg)

    def _losses(
        self,
        logits: torch.Tensor,
        scores: torch.Tensor,
        routed: torch.Tensor,
        kept: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """(A training forward.) The weighted auxiliary losses (None when both coefficients are 0); records
        the router statistics. Without a balance loss, its value for the metrics is the rank's own tokens'
        (the assignments are not summed over the sequence's ranks: no collective for a metric alone)."""
        moe = self.cfg.moe
        probs = scores if moe.router == "softmax" else scores / scores.sum(-1, keepdim=True)  # as Megatron does
        shares = self._balance_shares(routed) if moe.aux_loss_coeff else routed / routed.sum()
        balance = moe.num_experts * (probs.mean(0) * shares.to(probs.dtype)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        dropped = (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.long, device=logits.device)
        self._record(kept, balance.detach(), z.detach(), dropped)
        if not (moe.aux_loss_coeff or moe.z_loss_coeff):
            return None
        # TP ranks' gradients add up (CP ranks' average, as their main losses do): each its share of the mean
        return (moe.aux_loss_coeff * balance + moe.z_loss_coeff * z) / self.tp_shards_tokens

    def _balance_shares(self, routed: torch.Tensor) -> torch.Tensor:
        """Each expert's share of the assignments the balance loss weighs (see `aux_loss_scope`)."""
        if self.cfg.moe.aux_loss_scope == "micro_batch":
            counts = _summed(routed, self.sequence)
            return counts / counts.sum()
        if _UNCOUNTED[0]:  # a recompute: what its first forward used (the pipeline's shape inference: anything)
            return self.step_shares.popleft() if self.step_shares else routed / routed.sum()
        counts = _summed(routed, self.batch).float()
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        shares = self.step_counts / self.step_counts.sum()  # the running mean: each micro-batch assigns alike
        self.step_shares.append(shares)
        return shares

    def start_step(self) -> None:
        """A new optimizer step: the global scope's running shares start again."""
        self.step_counts = None
        self.step_shares.clear()

    def _record(self, kept: torch.Tensor, balance: torch.Tensor, z: torch.Tensor, dropped: torch.Tensor) -> None:
        if _UNCOUNTED[0]:  # full recompute's second forward and the pipeline's shape inference do not count
            return
        if self.stats is None:
            zero = torch.zeros_like(balance)
            self.stats = RouterStats(torch.zeros_like(kept), zero.clone(), zero.clone(), torch.zeros_like(dropped))
        s = self.stats
        s.tokens_per_expert += kept
        s.aux_loss += balance
        s.z_loss += z
        s.dropped += dropped
        s.forwards += 1

    def take_stats(self) -> RouterStats | None:
        stats, self.stats = self.stats, None
        return stats

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: each expert's selection bias moves by the rate towards the mean load
        (up when under-loaded, down when over-loaded). `tokens_per_expert`: this step's, over the whole batch."""
        if self.bias is not None:
            load = tokens_per_expert.float()
            self.bias += self.cfg.moe.bias_update_rate * torch.sign(load.mean() - load)


def layout_warning(cfg: ModelConfig, dp: int, micro_batches: int) -> str | None:
    """The one MoE setting under which a layout trains another model than one process does (as Megatron-LM's):
    the global balance loss's running mean sums DP ranks' micro-batches at once. A warning line, or None."""
    moe = cfg.moe
    if not (moe.num_experts and moe.aux_loss_coeff and moe.aux_loss_scope == "global" and dp > 1 and micro_batches > 1):
        return None
    return (
        f"warning: model.moe.aux_loss_scope: global averages each micro-batch's expert shares, summed over the {dp} "
        "data-parallel ranks, with the step's earlier ones, as Megatron-LM's global_aux_loss does, so the balance loss "
        "depends on the data-parallel size (one micro-batch per rank, or scope micro_batch, does not)"
    )


def _gathered(x: torch.Tensor, groups: list) -> torch.Tensor:
    """Every rank's `x` of `groups`, stacked along dim 0 (in no order that matters to the caller)."""
    for group in groups:
        out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group.pg)
        x = out
    return x


def _summed(counts: torch.Tensor, groups: list) -> torch.Tensor:
    """`counts` summed over every rank of `groups` (a new tensor when there is any)."""
    if groups:
        counts = counts.clone()
        for group in groups:
            dist.all_reduce(counts, group=group.pg)
    return counts
