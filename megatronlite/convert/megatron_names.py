"""megatron-core's tensor names for a GPT model, and how they map to ours.

Names here carry global layer indices (`decoder.layers.{i}.self_attention.linear_qkv.weight`);
the torch_dist module stacks them on a layer dim and the legacy module numbers them per pipeline
stage. Norm weights use Transformer Engine's names (`linear_qkv.layer_norm_weight`), which are
also what megatron-core's local layers map their norms to in a sharded checkpoint.

Megatron's QKV is grouped per KV head exactly like ours, its SwiGLU fc1 (weight and bias) is [gate; up], its
q/k norms are `self_attention.q_layernorm` / `k_layernorm`, and its
vocabulary is padded to a multiple of 128 x TP: the padding is removed on import and added (as
zeros) on export.
"""

from __future__ import annotations

import re

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert.mapping import Mapping, Rule, pad_rows, rename

LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def mapping(m: ModelConfig, padded: int) -> Mapping:
    """The rules for `m`'s tensors: which exist follows its features (biases, norm kind, qk-norm, positions)."""

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

    rules = [vocab("embedding.word.weight", "embedding.word_embeddings.weight")]
    if m.position == "learned":
        rules.append(rename("embedding.position", "embedding.position_embeddings.weight"))
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = theirs + "self_attention.", theirs + "mlp."
        rules += norm(ours + "attn_norm", attn + "linear_qkv.layer_norm_")
        rules += linear(ours + "attention.qkv", attn + "linear_qkv", m.qkv_bias)
        if m.qk_norm:  # always RMSNorm: weights only
            rules += [rename(ours + f"attention.{x}_norm.weight", attn + f"{x}_layernorm.weight") for x in "qk"]
        rules += linear(ours + "attention.proj", attn + "linear_proj", m.bias)
        rules += norm(ours + "mlp_norm", mlp + "linear_fc1.layer_norm_")
        rules += linear(ours + "mlp.fc1", mlp + "linear_fc1", m.bias, gated=m.gated)
        rules += linear(ours + "mlp.fc2", mlp + "linear_fc2", m.bias)
    rules += norm("final_norm", "decoder.final_layernorm.")
    if not m.tied:
        rules.append(vocab("output.weight", "output_layer.weight"))
    return Mapping(rules)


def ignored(m: ModelConfig, name: str) -> bool:
    """Stored entries that are no weights: TE/FP8 extra state, the last stage's copy of a tied embedding."""
    return name.endswith("._extra_state") or (m.tied and name == "output_layer.weight")
