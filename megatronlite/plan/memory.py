"""Bytes per GPU of one layout: model states counted by the code that allocates them, activations by formula.

Model states. Each rank's stages are built on the meta device from a mesh described without processes
(layout.mesh_at), then handed to the real `DataParallel`, which lays every parameter and gradient into its
flat buckets (padded to a multiple of the grad group under ZeRO-1) and says which slices this rank's
optimizer steps. Parameters are fp32 (their own master weights; bf16 runs autocast), gradients are fp32
bucket buffers, ZeRO-1 adds each bucket's reduced fp32 slice, and AdamW keeps two fp32 moments (and, fused, a
step counter) per tensor it steps. Under bf16/fp16, autocast keeps a half-precision copy of every matmul
weight alive through the step (the cast cache, then the copies the GEMMs saved for backward).

The DeepSpeed engine's states follow DeepSpeed's layout instead (plan/deepspeed_memory.py).

Activations. What one micro-batch leaves saved for backward, layer by layer, as our model builds it (not a
generic transformer): fp32 residual stream and norm statistics; linear inputs, QKV, rotated q and k, the
attention output and its log-sum-exp, the MLP's intermediates in the compute dtype. Sequence parallelism
divides what the norms save, not the linear inputs (each gathered input is saved whole); CP divides the
sequence. Selective recompute drops only the attention kernel's log-sum-exp (the kernels keep no s x s
scores); full recompute keeps each layer's input and recomputes one layer at a time in backward. Times
the micro-batches (or interleaved chunks) a stage holds at once under its schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from megatronlite.config import Config, micro_batches
from megatronlite.models.gpt import RunOptions
from megatronlite.parallel.data_parallel import DataParallel
from megatronlite.parallel.stages import build_stages, stage_layers
from megatronlite.plan.hardware import ALLOWANCE
from megatronlite.plan.layout import mesh_at

FP32 = 4


def compute_bytes(precision: str) -> int:
    """Bytes of an activation the GEMMs see: half precision under autocast, else fp32."""
    return 2 if precision in ("bf16", "fp16") else FP32


@dataclass(frozen=True)
class ModelStates:
    """One rank's model-state bytes, as allocated."""

    weights: int  # fp32 parameter buckets
    weight_copies: int  # half-precision autocast copies of matmul weights (0 in fp32)
    grads: int  # fp32 gradient buckets (ZeRO-2: those in flight), plus ZeRO's reduced slices
    optimizer: int  # Adam moments (and step counters) of what this rank steps
    gather_buffer: int  # ZeRO-1: the largest bucket slice cloned for the weight all-gather
    grads_in_flight: int  # ZeRO-2: full-size gradient buckets alive during backward (not at rest)

    @property
    def transient(self) -> int:
        """Buffers alive for part of a step: the gather after it, or ZeRO-2's buckets during backward."""
        return max(self.gather_buffer, self.grads_in_flight)


def _late_sync_names(cfg: Config, mesh, params: dict) -> set[str]:
    """The parameters the trainer puts in DataParallel's last bucket: the trainer's own rule."""
    from megatronlite.train.trainer import late_sync_groups

    return set(late_sync_groups(cfg, mesh, params))


def _matmul_weights(model) -> int:
    """Elements of the weights a stage multiplies by (autocast copies each): all 2-D ones but the embedding
    tables, plus the word embedding where it is also this stage's output layer (tied, one stage)."""
    out = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embedding."))
    if model.post_process and model.output is None:
        out += model.embedding.word.weight.numel()
    return out


def model_states(cfg: Config, world_size: int, rank: int) -> ModelStates:
    """Model-state bytes of `rank` when `cfg` trains on `world_size` GPUs (nothing real is allocated)."""
    if cfg.parallel.engine == "deepspeed":
        from megatronlite.plan.deepspeed_memory import deepspeed_states

        return deepspeed_states(cfg, world_size, rank)
    mesh = mesh_at(cfg, world_size, rank)
    options = RunOptions(sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.train.recompute)
    with torch.device("meta"):
        stages = build_stages(cfg, mesh, options)
        params = {n: p for _, model in stages for n, p in model.named_parameters()}
        dp = DataParallel(
            params,
            mesh.role("grad"),
            1,
            cfg.parallel.zero,
            cfg.parallel.bucket_mb,
            _late_sync_names(cfg, mesh, params),
            mesh.role("expert_grad"),
        )
    owned = dp.owned_slices()
    step_counter = FP32 if cfg.optim.impl in ("auto", "fused") and cfg.optim.offload_to == "none" else 0
    moments = 0 if cfg.optim.offload_to != "none" else 2 * FP32
    shards = [b.grad_shard for b in dp.buckets if b.grad_shard is not None]
    matmul = sum(_matmul_weights(model) for _, model in stages)
    half = compute_bytes(cfg.train.precision)
    copies = half if half != FP32 else 0
    return ModelStates(
        weights=sum(b.param_buf.numel() * b.param_buf.element_size() for b in dp.buckets),
        weight_copies=copies * matmul,
        grads=sum(b.grad_buf.numel() * FP32 for b in dp.buckets if b.grad_buf is not None)
        + sum(s.numel() * FP32 for s in shards),
        optimizer=sum(o.shard.numel() * moments + step_counter for o in owned),
        gather_buffer=max((s.numel() * FP32 for s in shards), default=0),
        grads_in_flight=streamed_in_flight(dp),
    )


def streamed_in_flight(dp: DataParallel) -> int:
    """ZeRO-2's transient full-size gradients: a bucket being filled while the previous one is reduced (the
    two largest, as a bound)."""
    sizes = sorted((b.param_buf.numel() * FP32 for b in dp.buckets if b.streamed), reverse=True)
    return sum(sizes[:2])


# --- activations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """What one micro-batch's activations on one rank depend on."""

    tokens: int  # micro_batch x seq_len / CP: the tokens a linear layer sees on this rank
    norm_tokens: int  # the tokens a norm sees (divided by TP under sequence parallelism)
    c: int  # bytes per compute-dtype element


def layer_shape(cfg: Config) -> LayerShape:
    p, t = cfg.parallel, cfg.train
    tokens = t.micro_batch_size * t.seq_len // p.context
    sp = p.sequence_parallel and p.tensor > 1
    return LayerShape(tokens, tokens // p.tensor if sp else tokens, compute_bytes(t.precision))


def norm_saved(cfg: Config, n_tokens: int) -> int:
    """A norm saves its input in fp32 (the upcast its statistics are computed on) and per-row statistics (rstd;
    LayerNorm also the mean)."""
    stats = FP32 if cfg.model.norm == "rmsnorm" else 2 * FP32
    return n_tokens * (cfg.model.hidden_size * FP32 + stats)


def mlp_saved(cfg: Config, options: RunOptions, rows: int, f: int, c: int) -> int:
    """What a dense MLP of width `f` saves over `rows` tokens, its input aside."""
    if not cfg.model.gated:
        return 2 * rows * f * c  # fc1 output (GELU's input) and fc2's input
    if options.kernels.get("swiglu", "torch") == "torch":
        return 4 * rows * f * c  # gate, up, silu(gate), and fc2's input
    return 3 * rows * f * c  # the fused [gate; up] and fc2's input


def moe_saved(cfg: Config, options: RunOptions, tokens: int, c: int) -> int:
    """What an MoE layer saves over `tokens` tokens, its input aside: the router's fp32 input copy (under
    half-precision autocast) and, with auxiliary losses, its fp32 scores; the k rows per token sent to the
    experts and the experts' outputs (their GEMMs' inputs, and what the weights multiply); the experts' MLPs
    over those rows (the grouped path runs SwiGLU unfused) and, under autocast, the half-precision copy of
    this rank's expert weights; the shared expert."""
    m = cfg.model
    moe, h = m.moe, m.hidden_size
    rows = tokens * moe.top_k
    out = tokens * h * FP32 if c != FP32 else 0
    if moe.aux_loss_coeff or moe.z_loss_coeff:
        out += 3 * tokens * moe.num_experts * FP32  # scores, and the losses' probabilities and log-sum-exp
    gated = 4 if m.gated else 2
    out += 2 * rows * h * c + gated * rows * m.expert_ffn_size * c + rows * (FP32 + 8)  # + weights, token ids
    if c != FP32:  # each stacked expert weight cast once per forward, kept for backward
        out += (3 if m.gated else 2) * moe.num_experts // cfg.parallel.expert * h * m.expert_ffn_size * c
    if moe.shared_expert_ffn_hidden_size:
        out += mlp_saved(cfg, options, tokens, moe.shared_expert_ffn_hidden_size, c)
        out += tokens * h * c * moe.shared_expert_gate  # the shared output, kept for its gate's product
    return out


def layer_saved(cfg: Config, options: RunOptions, recompute: str, experts: bool = False) -> int:
    """Bytes one transformer layer (`experts`: an MoE layer) saves for backward for one micro-batch, with
    recompute none or selective."""
    m, tp = cfg.model, cfg.parallel.tensor
    s = layer_shape(cfg)
    heads, kv, d, h = m.num_heads // tp, m.kv_heads // tp, m.head_size, m.hidden_size
    norms = 2 * norm_saved(cfg, s.norm_tokens)
    linear_inputs = 2 * s.tokens * h * s.c  # QKV and fc1 (or router) inputs (gathered whole under SP)
    # QKV (V, and k, stay views of it); q and k rotated, or without RoPE a copy of q when GQA groups it; the
    # attention output (also the projection's input: the kernels write it [b, s, heads, d], so the transpose
    # before the projection is a view)
    if m.position == "rope":
        qk = heads + kv
    else:
        qk = heads if m.kv_heads != m.num_heads else 0
    attention = s.tokens * s.c * d * ((heads + 2 * kv) + qk + heads)
    if recompute != "selective":
        attention += s.tokens * heads * FP32  # the log-sum-exp the attention kernel keeps
    if m.qk_norm:
        attention += s.tokens * (heads * d * s.c + (heads + kv) * FP32)  # q copy the norm saves, rstds
    if experts:
        mlp = moe_saved(cfg, options, s.tokens, s.c)
    else:
        mlp = mlp_saved(cfg, options, s.tokens, m.ffn_size // tp, s.c)
    return norms + linear_inputs + attention + mlp


def stage_saved(cfg: Config, options: RunOptions, layers: list[int], first: bool, last: bool) -> int:
    """Bytes one micro-batch leaves saved on one stage holding `layers` (global ids) after its forward."""
    s = layer_shape(cfg)
    t = cfg.train
    experts = cfg.model.moe.layers(cfg.model.num_layers)
    if t.recompute == "full":
        full = min(t.recompute_layers or len(layers), len(layers))
        out = full * s.norm_tokens * cfg.model.hidden_size * s.c  # each layer's input: the residual stream
        out += sum(layer_saved(cfg, options, "none", experts[i]) for i in layers[full:])
    else:
        out = sum(layer_saved(cfg, options, t.recompute, experts[i]) for i in layers)
    if first:
        out += s.tokens * 8 * (2 if cfg.parallel.tensor > 1 else 1)  # token ids (and TP's local ids), int64
    if last:
        out += loss_saved(cfg, options)
    return out


def loss_saved(cfg: Config, options: RunOptions) -> int:
    """The final norm, output layer and loss of one micro-batch (last stage)."""
    m, tp = cfg.model, cfg.parallel.tensor
    s = layer_shape(cfg)
    out = norm_saved(cfg, s.norm_tokens)
    vocab_local = m.padded_vocab_size(tp) // tp
    if options.fused_cross_entropy:  # the gradients, computed in forward: hidden and the weight shard
        return out + s.tokens * m.hidden_size * FP32 + vocab_local * m.hidden_size * FP32
    vocab = m.vocab_size if tp == 1 else vocab_local
    return out + s.tokens * m.hidden_size * s.c + s.tokens * (vocab * FP32 + 8)  # input, fp32 softmax, targets


def in_flight(cfg: Config, pp_rank: int, n_micro: int) -> int:
    """Micro-batch chunks (one virtual stage each) whose activations `pp_rank` holds at once at its peak.

    1F1B: P - rank micro-batches; interleaved (and zero-bubble): Megatron's warm-up count, 2 (P - rank - 1)
    + (V - 1) P, plus one; GPipe: every micro-batch. Never more than the step has."""
    p = cfg.parallel
    if p.pipeline == 1:
        return 1
    if p.schedule == "gpipe":
        return n_micro
    if p.schedule in ("interleaved", "zero_bubble"):
        return min(
            n_micro * p.virtual_pipeline, 2 * (p.pipeline - pp_rank - 1) + (p.virtual_pipeline - 1) * p.pipeline + 1
        )
    return min(n_micro, p.pipeline - pp_rank)


def activations(cfg: Config, options: RunOptions, pp_rank: int, n_micro: int) -> tuple[int, int]:
    """(activations of the layers, output layer and loss) held at once on `pp_rank` at its peak."""
    p = cfg.parallel
    layers = stage_layers(cfg)
    chunks = [layers[i] for i in range(pp_rank, len(layers), p.pipeline)]
    first, last = pp_rank == 0, pp_rank == p.pipeline - 1
    per_chunk = max(stage_saved(cfg, options, chunk, first, False) for chunk in chunks)
    held = in_flight(cfg, pp_rank, n_micro) * per_chunk
    if cfg.train.recompute == "full":  # backward recomputes one layer's activations at a time
        kinds = {cfg.model.moe.layers(cfg.model.num_layers)[i] for chunk in chunks for i in chunk}
        held += max(layer_saved(cfg, options, "none", experts) for experts in kinds)
    return held, (loss_saved(cfg, options) if last else 0)


# --- one rank's total -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    weights: int
    weight_copies: int
    grads: int
    optimizer: int
    activations: int
    loss: int
    buffers: int  # PP send/recv, the ZeRO gather clone or ZeRO-2's gradient buckets in flight
    allowance: int  # CUDA context, NCCL, allocator fragmentation (hardware.ALLOWANCE)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stage_rank(cfg: Config, world_size: int, pp_rank: int) -> int:
    """The first global rank of pipeline stage `pp_rank` (PP is the grid's outermost axis)."""
    return pp_rank * (world_size // cfg.parallel.pipeline)


def rank_memory(cfg: Config, states: ModelStates, pp_rank: int, n_micro: int, options: RunOptions) -> Memory:
    """Memory of a rank of pipeline stage `pp_rank` holding `states`."""
    p = cfg.parallel
    held, loss = activations(cfg, options, pp_rank, n_micro)
    s = layer_shape(cfg)
    pp_buffers = 2 * p.virtual_pipeline * s.norm_tokens * cfg.model.hidden_size * FP32 if p.pipeline > 1 else 0
    subtotal = (
        sum((states.weights, states.weight_copies, states.grads, states.optimizer, held, loss, pp_buffers))
        + states.transient
    )
    allowance = ALLOWANCE.context_bytes + math.ceil(ALLOWANCE.fragmentation * subtotal)
    return Memory(
        states.weights,
        states.weight_copies,
        states.grads,
        states.optimizer,
        held,
        loss,
        pp_buffers + states.transient,
        allowance,
    )


def stage_memories(cfg: Config, n_micro: int, options: RunOptions, states: Callable[[int], ModelStates]) -> dict:
    """{pp_rank: Memory} of the first and the last pipeline stage, the two candidates for the heaviest rank: the
    first holds the most micro-batches in flight and the embedding, the last the output layer and the loss.
    `states(pp_rank)`: that stage's model states."""
    return {s: rank_memory(cfg, states(s), s, n_micro, options) for s in sorted({0, cfg.parallel.pipeline - 1})}


def layout_memories(cfg: Config, world_size: int, options: RunOptions) -> dict:
    """`stage_memories` of `cfg`'s own layout on `world_size` GPUs, each stage's model states built for it."""
    p = cfg.parallel
    dp = world_size // (p.tensor * p.pipeline * p.context)

    def states(pp_rank: int) -> ModelStates:
        return model_states(cfg, world_size, stage_rank(cfg, world_size, pp_rank))

    return stage_memories(cfg, micro_batches(cfg.train, dp), options, states)
