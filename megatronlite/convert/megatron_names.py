"""megatron-core's tensor names for a GPT model, and how they map to ours.

Names here carry global layer indices (`decoder.layers.{i}.self_attention.linear_qkv.weight`);
the torch_dist module stacks them on a layer dim and the legacy module numbers them per pipeline
stage. Norm weights use Transformer Engine's names (`linear_qkv.layer_norm_weight`), which are
also what megatron-core's local layers map their norms to in a sharded checkpoint.

Megatron's QKV is grouped per KV head exactly like ours, its SwiGLU fc1 (weight and bias) is [gate; up], its
q/k norms are `self_attention.q_layernorm` / `k_layernorm`, and its
vocabulary is padded to a multiple of 128 x TP: the padding is removed on import and added (as
zeros) on export.

Mixture of experts (megatron-core's MoELayer, in the layers --moe-layer-freq picks; ours `model.moe`):
- the router `mlp.router.weight` [E, h], and with --moe-router-enable-expert-bias the persistent buffer
  `mlp.router.expert_bias` [E] (fp32), which is no weight of ours (see `expert_biases`);
- the experts `mlp.experts.experts.linear_fc1.weight` [E, 2f, h] (each expert's [gate; up], as a dense fc1) and
  `mlp.experts.experts.linear_fc2.weight` [E, h, f], expert e the global one. These are the names and layout
  megatron-core's three expert modules all give in a sharded (torch_dist) checkpoint: SequentialMLP (its
  `local_experts.N.linear_fc1.weight` stacked), GroupedMLP (`weight1` [h, E*2f] read as [E, h, 2f] and
  transposed) and TEGroupedMLP (`linear_fc1.weight0..N`); the legacy module turns each rank file's form into them;
- the shared expert `mlp.shared_experts.linear_fc1/linear_fc2.weight` (a dense MLP of
  --moe-shared-expert-intermediate-size) and, with --moe-shared-expert-gate, `mlp.shared_experts.gate_weight`
  [1, h]: its output times sigmoid(x . gate_weight), Qwen2-MoE's gate and ours;
- the norm before the experts: a module of its own in an MoE layer, `pre_mlp_layernorm.weight` under Transformer
  Engine (a dense layer fuses it into linear_fc1: `linear_fc1.layer_norm_weight`). megatron-core's local layers call
  it `pre_mlp_layernorm` in their state dict but `mlp.linear_fc1.layer_norm_weight` in a sharded checkpoint, as
  they do a dense layer's, so a torch_dist MoE checkpoint holds one or the other by its writer's spec: we read
  either and write the one `spec` names.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert.mapping import Mapping, Rule, fused_pair, pad_rows, rename

LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
EXPERTS = "mlp.experts.experts."  # a layer's stacked experts (global indices), as sharded checkpoints name them
EXPERT_BIAS = "mlp.router.expert_bias"


def mapping(m: ModelConfig, padded: int, spec: str = "te", stored: Collection[str] = ()) -> Mapping:
    """The rules for `m`'s tensors: which exist follows its features (biases, norm kind, qk-norm, positions, experts).
    An MoE layer's pre-MLP norm is named as `stored` holds it (reading), else as the `spec` layers (writing)."""

    def vocab(ours: str, theirs: str) -> Rule:
        return Rule((ours,), (theirs,), lambda t: (t[: m.vocab_size],), lambda t: (pad_rows(t, padded),))

    def gate_up(ours: str, theirs: str) -> Rule:
        parts = (ours + ".gate", ours + ".up")
        return Rule(parts, (theirs,), lambda t: tuple(t.chunk(2)), lambda gate, up: (torch.cat([gate, up]),))

    def linear(ours: str, theirs: str, bias: bool, gated: bool = False) -> list[Rule]:
        kinds = ("weight", "bias") if bias else ("weight",)
        return [(gate_up if gated else rename)(f"{ours}.{s}", f"{theirs}.{s}") for s in kinds]

    def norm(ours: str, theirs: str) -> list[Rule]:
        """`theirs` + weight (and bias for LayerNorm): Megatron's names append the kind to a prefix."""
        kinds = ("weight", "bias") if m.norm == "layernorm" else ("weight",)
        return [rename(f"{ours}.{s}", theirs + s) for s in kinds]

    def experts(ours: str, layer: str) -> list[Rule]:
        """One MoE layer's MLP: `ours` is our `layers.i.mlp.`, `layer` megatron-core's `decoder.layers.i.`."""
        mlp, fc1, fc2 = layer + "mlp.", layer + EXPERTS + "linear_fc1.weight", layer + EXPERTS + "linear_fc2.weight"
        rules = [rename(ours + "router", mlp + "router.weight")]
        if m.gated:  # our gate and up [E, f, h] are each expert's [gate; up] rows
            rules += [fused_pair(ours + "gate", ours + "up", fc1), rename(ours + "down", fc2)]
        else:
            rules += [rename(ours + "fc1", fc1), rename(ours + "fc2", fc2)]
        if m.moe.shared_expert_ffn_hidden_size:
            rules += linear(ours + "shared.mlp.fc1", mlp + "shared_experts.linear_fc1", False, gated=m.gated)
            rules += linear(ours + "shared.mlp.fc2", mlp + "shared_experts.linear_fc2", False)
            if m.moe.shared_expert_gate:
                rules.append(rename(ours + "shared.gate", mlp + "shared_experts.gate_weight"))
        return rules

    def moe_norm(layer: str) -> str:
        own, fused = layer + "pre_mlp_layernorm.", layer + "mlp.linear_fc1.layer_norm_"
        if stored:
            return own if own + "weight" in stored else fused
        return own if spec == "te" else fused

    rules = [vocab("embedding.word.weight", "embedding.word_embeddings.weight")]
    if m.position == "learned":
        rules.append(rename("embedding.position", "embedding.position_embeddings.weight"))
    for i, has_experts in enumerate(m.moe.layers(m.num_layers)):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = theirs + "self_attention.", theirs + "mlp."
        rules += norm(ours + "attn_norm", attn + "linear_qkv.layer_norm_")
        rules += linear(ours + "attention.qkv", attn + "linear_qkv", m.qkv_bias)
        if m.qk_norm:  # always RMSNorm: weights only
            rules += [rename(ours + f"attention.{x}_norm.weight", attn + f"{x}_layernorm.weight") for x in "qk"]
        rules += linear(ours + "attention.proj", attn + "linear_proj", m.bias)
        if has_experts:
            rules += norm(ours + "mlp_norm", moe_norm(theirs))
            rules += experts(ours + "mlp.", theirs)
            continue
        rules += norm(ours + "mlp_norm", mlp + "linear_fc1.layer_norm_")
        rules += linear(ours + "mlp.fc1", mlp + "linear_fc1", m.bias, gated=m.gated)
        rules += linear(ours + "mlp.fc2", mlp + "linear_fc2", m.bias)
    rules += norm("final_norm", "decoder.final_layernorm.")
    if not m.tied:
        rules.append(vocab("output.weight", "output_layer.weight"))
    return Mapping(rules)


def expert_biases(m: ModelConfig) -> list[str]:
    """The MoE layers' `mlp.router.expert_bias` (--moe-router-enable-expert-bias): aux-loss-free balancing's
    selection biases, a persistent buffer megatron-core loads strictly. megatronlite keeps them as training state,
    not as weights (a model loaded from weights routes with zero biases), so they are written as zeros and a
    nonzero one read is refused (see megatron.read)."""
    if not m.moe.bias_update_rate:
        return []
    return [f"decoder.layers.{i}.{EXPERT_BIAS}" for i, e in enumerate(m.moe.layers(m.num_layers)) if e]


def ignored(m: ModelConfig, name: str) -> bool:
    """Stored entries that are no weights: TE/FP8 extra state, the last stage's copy of a tied embedding, the
    experts' selection biases (checked apart)."""
    return (
        name.endswith("._extra_state")
        or (m.tied and name == "output_layer.weight")
        or (bool(m.moe.bias_update_rate) and name.endswith("." + EXPERT_BIAS))
    )
