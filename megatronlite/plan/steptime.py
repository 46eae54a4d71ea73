"""Step time of one layout: compute at an achievable rate, collectives over their links, the pipeline bubble.

compute   hardware FLOPs of the step / GPUs / (peak x efficiency); recompute adds its forward FLOPs
tp        per layer and micro-batch, forward and backward: two all-reduces (or, under SP, two all-gathers and
          two reduce-scatters: the same bytes) of the layer's activations, over the node's links, not overlapped
cp        K and V passed round the ring each layer (their gradients back), counted whole: an upper bound
pp        each micro-batch's hidden states to the next stage and its gradient back, per virtual stage
ep        per MoE layer and micro-batch, two all-to-alls forward (dispatch, combine) and two backward of the k rows
          per token, the (ep - 1) / ep share leaving the rank, not overlapped
bubble    (P - 1) / m of compute for 1F1B and GPipe, (P - 1) / (m V) interleaved (and zero-bubble)
dp        fp32 gradient all-reduce (ZeRO-1: reduce-scatter + fp32 weight all-gather), overlapped with the last
          micro-batch's backward; ZeRO-1's gather after the step is not
optimizer the Adam step reads and writes weights, gradients and two moments once: bound by HBM bandwidth
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatronlite.config import Config, micro_batches
from megatronlite.models.counting import attended_keys, flops_per_token
from megatronlite.plan.hardware import GPU
from megatronlite.plan.memory import FP32, compute_bytes


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    tp: float
    cp: float
    ep: float
    pp: float
    dp: float
    optimizer: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def parts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def hardware_flops_per_token(cfg: Config) -> float:
    """Model FLOPs per token plus what recompute runs again (full: a forward, selective: attention's core)."""
    m, seq = cfg.model, cfg.train.seq_len
    model = flops_per_token(m, seq)
    if cfg.train.recompute == "full":  # the layers' forward again (train.recompute_layers of each stage's)
        stage_layers = m.num_layers / cfg.parallel.pipeline
        share = min(1.0, cfg.train.recompute_layers / stage_layers) if cfg.train.recompute_layers else 1.0
        return model + share * (model - 6 * m.vocab_size * m.hidden_size) / 3  # the output layer is not redone
    if cfg.train.recompute == "selective":
        return model + 4 * m.num_layers * attended_keys(seq, m.sliding_window) * m.num_heads * m.head_size
    return model


def _ring(bytes_: float, n: int, bandwidth: float, latency: float, all_reduce: bool = False) -> float:
    """Seconds of a ring collective over `n` ranks moving a `bytes_` tensor (all-reduce moves twice)."""
    if n == 1:
        return 0.0
    return latency + (2 if all_reduce else 1) * (n - 1) / n * bytes_ / bandwidth


def step_time(cfg: Config, gpus: int, gpus_per_node: int, hw: GPU, efficiency: float, weights_bytes: int) -> StepTime:
    """Seconds of one optimizer step; `weights_bytes`: this rank's fp32 parameter buckets (DP and Adam traffic)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp = gpus // (p.tensor * p.pipeline * p.context)
    n_micro = micro_batches(t, dp)
    tokens = t.global_batch_size * t.seq_len
    compute = hardware_flops_per_token(cfg) * tokens / gpus / (hw.peak_flops * efficiency)
    passes = 3 if t.recompute == "full" else 2  # forward, backward (and the recomputed forward)
    layers = m.num_layers // p.pipeline  # on this rank, over all its virtual stages
    c = compute_bytes(t.precision)
    local = t.micro_batch_size * t.seq_len // p.context  # tokens of one micro-batch on this rank

    def link(span: int) -> float:
        return hw.intra_node if span <= gpus_per_node else hw.inter_node

    tp = passes * layers * n_micro * 2 * _ring(local * m.hidden_size * c, p.tensor, link(p.tensor), hw.latency, True)
    kv = local * 2 * m.kv_heads // p.tensor * m.head_size * c
    cp_step = hw.latency + kv / link(p.tensor * p.context)
    cp = passes * layers * n_micro * (p.context - 1) * cp_step if p.context > 1 else 0.0
    ep = 0.0
    if p.expert > 1:
        moe_layers = sum(m.moe.layers(m.num_layers)) / p.pipeline
        rows = local // (p.tensor if p.sequence_parallel else 1) * m.moe.top_k * m.hidden_size * c
        one = hw.latency + rows * (p.expert - 1) / p.expert / link(p.tensor * p.expert)
        ep = passes * moe_layers * n_micro * 2 * one
    sent = local // (p.tensor if p.sequence_parallel else 1) * m.hidden_size * FP32
    pp = 2 * n_micro * p.virtual_pipeline * (hw.latency + sent / link(gpus)) if p.pipeline > 1 else 0.0
    bubble = 0.0
    if p.pipeline > 1:
        chunks = n_micro * (1 if p.schedule in ("1f1b", "gpipe") else p.virtual_pipeline)
        bubble = compute * (p.pipeline - 1) / chunks
    grad_group = dp * p.context
    span = link(p.tensor * p.context * dp)
    reduce = _ring(weights_bytes, grad_group, span, hw.latency, all_reduce=p.zero == 0)
    overlap = compute / n_micro * 2 / 3  # the last micro-batch's backward
    if p.zero == 2:  # every micro-batch's gradients reduce-scattered, each overlapping its own backward
        reduce, overlap = reduce * n_micro, overlap * n_micro
    dp_time = max(0.0, reduce - overlap)
    if p.zero:
        dp_time += _ring(weights_bytes, grad_group, span, hw.latency)  # the updated weights, gathered after the step
    owned = weights_bytes / (grad_group if p.zero else 1)
    optimizer = owned * 7 / hw.hbm  # reads weight, grad, 2 moments; writes weight, 2 moments (fp32 each)
    return StepTime(compute, bubble, tp, cp, ep, pp, dp_time, optimizer)
