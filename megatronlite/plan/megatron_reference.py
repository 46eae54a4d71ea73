"""Megatron-LM's theoretical memory for a layout, the figure its `report_theoretical_memory` prints, for checking
the planner against it (tests/test_plan_megatron.py, bench/bench_plan.py).

Megatron's figure is a closed formula, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", table 2) as Megatron-LM generalises it:
- weights and optimizer: the parameters of the most loaded shard (its layers over PP, plus the word embedding,
  both over TP; the output layer too when untied and PP = 1) times 18 bytes (bf16 weight, fp32 gradient, fp32
  master weight, two fp32 Adam moments) or, with the distributed optimizer, 6 + 12 / DP bytes;
- activations of the first pipeline stage, in bytes for bf16 tensors with 1-byte dropout masks: with sequence
  parallelism and selective recompute, sbh (18 + 4 f / h) per layer over TP (table 2's 34 sbh / t for f = 4h);
  otherwise sbh (10 + 24 / t) per layer (the flash-attention form: norms and linear inputs whole, the rest
  over TP) and 5% more for temporaries; times the layers, the interleaving penalty 1 + (p - 1) / (p v) or
  min(1, m / p) for 1F1B; plus the embedding's input ids and dropout mask for p micro-batches; plus, with one
  stage, the output layer's input and fp32 logits.
Not modelled by Megatron, and so not here: GQA and SwiGLU in activations (taken as MHA and f = 4h outside the
SP + selective case), learned position embeddings, biases, ZeRO-2, context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatronlite.config import Config, micro_batches
from megatronlite.parallel.stages import stage_layers
from megatronlite.plan.memory import FP32, compute_bytes


@dataclass(frozen=True)
class MegatronMemory:
    weights_and_optimizer: float  # bytes on the most loaded rank
    activations: float  # bytes on the first pipeline stage: the layers and the embedding's
    output: float  # bytes of the output layer and loss, counted with one pipeline stage only
    params_on_shard: float  # the parameters the weights figure counts on the most loaded rank

    @property
    def total(self) -> float:
        return self.weights_and_optimizer + self.activations + self.output


def shard_params(cfg: Config) -> float:
    """Parameters of the most loaded model shard, counted as Megatron counts them."""
    m, p = cfg.model, cfg.parallel
    h, heads, groups = m.hidden_size, m.num_heads, m.kv_heads
    norm = 1 if m.norm == "rmsnorm" else 2  # LayerNorm has a bias
    attention = 2 * h * h * (1 + groups / heads) * (m.head_size * heads / h)
    layer = 2 * h * (m.ffn_size * (1.5 if m.gated else 1) + norm) + attention
    block = layer * m.num_layers + norm * h
    embedding = h * m.padded_vocab_size(p.tensor)
    out = (block / p.pipeline + embedding) / p.tensor
    if not m.tied and p.pipeline == 1:
        out += embedding / p.tensor
    return out


def megatron_memory(cfg: Config, world_size: int) -> MegatronMemory:
    """What Megatron-LM's `report_theoretical_memory` reports for `cfg`'s layout on `world_size` GPUs."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = world_size // (p.tensor * p.pipeline * p.context)
    params = shard_params(cfg)
    per_param = 6 + 12 / dp if p.zero else 18
    s, b, h, tp, pp = t.seq_len, t.micro_batch_size, m.hidden_size, p.tensor, p.pipeline
    sbh = s * b * h
    sp_selective = p.sequence_parallel and t.recompute == "selective"
    layer = sbh * (18 + 4 * m.ffn_size / h) if sp_selective else sbh * (10 + 24 / tp)
    # the layers; the input ids and the embedding's dropout mask; in flight on the first stage
    acts = (layer * m.num_layers + 8 * s * b * pp + sbh * pp) * schedule_factor(cfg, world_size)
    vocab = m.padded_vocab_size(tp)
    if sp_selective:
        output = sbh * 4 * (1 + vocab / h) / tp if pp == 1 else 0.0  # the output layer's input, fp32 logits
        acts /= tp
    else:
        output = (s * b * vocab / tp + sbh) * 2 * 1.05 if pp == 1 else 0.0
        acts *= 1.05
    return MegatronMemory(params * per_param, acts, output, params)


def schedule_factor(cfg: Config, world_size: int) -> float:
    """The share of all L layers' activations the first stage holds at once: 1 + (p - 1) / (p v) interleaved,
    min(1, m / p) for 1F1B (p micro-batches of L / p layers each)."""
    p = cfg.parallel
    if p.virtual_pipeline > 1:
        return 1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)
    dp = world_size // (p.tensor * p.pipeline * p.context)
    return min(1, micro_batches(cfg.train, dp) / p.pipeline) if p.pipeline > 1 else 1


def differences(cfg: Config, world_size: int, fused_swiglu: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(weights and optimizer, activations): the bytes by which the planner's figure for the first stage's rank
    differs from Megatron's, by cause, each derived from what our model stores and saves.

    Weights: ZeRO-1 shards only Adam's moments and the reduced gradients; our fp32 weights are the master copy
    and stay whole (Megatron shards an fp32 master copy and keeps bf16 weights), 4 bytes more per parameter.
    fp32 training keeps no bf16 copy, 2 bytes less. A learned position embedding (GPT-2) is on the first stage,
    whole on every TP rank; Megatron's count leaves it out. Activations, per layer, in sbh units (s b h bytes):
    norm inputs are the fp32 residual stream (8, not 4); no dropout, so no masks (-2); under SP the QKV and
    fc1 inputs are saved gathered, whole, instead of re-gathered in backward (4 instead of 4 / t); attention
    and MLP tensors at their real sizes (GQA's smaller K and V, RoPE's rotated q and k, SwiGLU's gate and up)
    instead of MHA with a GELU MLP; the attention kernel's fp32 log-sum-exp without recompute; and no 5%
    allowance for temporaries (the planner's allowance is a separate part). A first stage with its own number of
    layers (`parallel.pipeline_layers`) scales its share. Full recompute is not comparable: the formula
    ignores it (no activation causes are given)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, h, f = p.tensor, m.hidden_size, m.ffn_size
    params = shard_params(cfg)
    dp = world_size // (tp * p.pipeline * p.context)
    fp32 = compute_bytes(t.precision) == FP32
    per_param = (6 + 12 / dp if p.zero else 18) + (4 if p.zero else 0) - (2 if fp32 else 0)
    weights = {}
    if p.zero:
        weights["fp32 weights whole under ZeRO-1"] = 4 * params
    if fp32:
        weights["fp32 training: no bf16 weight copy"] = -2 * params
    if m.position == "learned":  # fp32 weight and gradient, Adam's moments and the reduced gradient (ZeRO: sharded)
        weights["learned position embedding"] = m.max_seq_len * h * (8 + (12 / dp if p.zero else 8))
    # parallel.pipeline_layers: the first stage holds its own count of layers, Megatron's formula L / p
    layers_here = sum(len(chunk) for chunk in stage_layers(cfg)[:: p.pipeline])
    uneven = layers_here / (m.num_layers / p.pipeline)
    if uneven != 1:
        weights["uneven pipeline split"] = (uneven - 1) * (params - h * m.padded_vocab_size(tp) / tp) * per_param
    sp = p.sequence_parallel and tp > 1
    sp_selective = p.sequence_parallel and t.recompute == "selective"
    heads, kv, d = m.num_heads, m.kv_heads, m.head_size
    attention = (2 * (heads + 2 * kv) + (2 * (heads + kv) if m.position == "rope" else 0) + 2 * heads) * d / h
    if m.position != "rope" and kv != heads:
        attention += 2 * heads * d / h  # q copied for the grouped product
    mlp = (6 if fused_swiglu else 8) * f / h if m.gated else 4 * f / h
    if sp_selective:  # Megatron: 18 + 4f/h over t = norms 4, linear inputs 4, Q K V and proj input 8, masks 2
        per_layer = {
            "fp32 norm inputs": 4 / tp,
            "no dropout masks": -2 / tp,
            "SP: linear inputs saved gathered": 4 - 4 / tp,
            "real attention and MLP sizes": (attention - 8 + mlp - 4 * f / h) / tp,
        }
    else:  # Megatron: 10 + 24/t = norms 4, linear inputs 4, masks 2 whole; Q K V, proj input and MLP 24 over t
        per_layer = {
            "norm inputs fp32 (and over TP under SP)": (8 / tp if sp else 8) - 4,
            "no dropout masks": -2,
            "real attention and MLP sizes": (attention + mlp - 24) / tp,
        }
        if t.recompute == "none":
            per_layer["attention's fp32 log-sum-exp"] = 4 * heads / tp / h
    if t.recompute == "full":  # not comparable: the formula counts every activation whatever the recompute
        return weights, {}
    sbh = t.seq_len * t.micro_batch_size * h
    layers = m.num_layers * schedule_factor(cfg, world_size)
    activations = {name: v * sbh * layers for name, v in per_layer.items() if v}
    megatron = megatron_memory(cfg, world_size).activations
    if not sp_selective:
        activations["no 5% temporaries"] = -megatron * (1 - 1 / 1.05)
    if uneven != 1:
        activations["uneven pipeline split"] = (uneven - 1) * (megatron + sum(activations.values()))
    return weights, activations
