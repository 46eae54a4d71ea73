"""megatron-core's tensor names for a GPT model, and how they map to ours.

Names here carry global layer indices (`decoder.layers.{i}.self_attention.linear_qkv.weight`);
the torch_dist module stacks them on a layer dim and the legacy module numbers them per pipeline
stage. Norm weights use Transformer Engine's names (`linear_qkv.layer_norm_weight`), which are
also what megatron-core's local layers map their norms to in a sharded checkpoint.

Megatron's QKV is grouped per KV head exactly like ours, its SwiGLU fc1 is [gate; up], and its
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
    def vocab(ours: str, theirs: str) -> Rule:
        return Rule((ours,), (theirs,), lambda t: (t[: m.vocab_size],), lambda t: (pad_rows(t, padded),))

    def gate_up(ours: str, theirs: str) -> Rule:
        parts = (ours + ".gate", ours + ".up")
        return Rule(parts, (theirs,), lambda t: tuple(t.chunk(2)), lambda gate, up: (torch.cat([gate, up]),))

    biases = ("weight", "bias") if m.arch == "gpt2" else ("weight",)
    rules = [vocab("embedding.word.weight", "embedding.word_embeddings.weight")]
    if m.arch == "gpt2":
        rules.append(rename("embedding.position", "embedding.position_embeddings.weight"))
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = theirs + "self_attention.", theirs + "mlp."
        for s in biases:
            rules += [
                rename(ours + f"attn_norm.{s}", attn + f"linear_qkv.layer_norm_{s}"),
                rename(ours + f"attention.qkv.{s}", attn + f"linear_qkv.{s}"),
                rename(ours + f"attention.proj.{s}", attn + f"linear_proj.{s}"),
                rename(ours + f"mlp_norm.{s}", mlp + f"linear_fc1.layer_norm_{s}"),
            ]
            if m.arch == "llama":
                rules.append(gate_up(ours + "mlp.fc1.weight", mlp + "linear_fc1.weight"))
            else:
                rules.append(rename(ours + f"mlp.fc1.{s}", mlp + f"linear_fc1.{s}"))
            rules.append(rename(ours + f"mlp.fc2.{s}", mlp + f"linear_fc2.{s}"))
    rules += [rename(f"final_norm.{s}", f"decoder.final_layernorm.{s}") for s in biases]
    if not m.tied:
        rules.append(vocab("output.weight", "output_layer.weight"))
    return Mapping(rules)


def ignored(m: ModelConfig, name: str) -> bool:
    """Stored entries that are no weights: TE/FP8 extra state, the last stage's copy of a tied embedding."""
    return name.endswith("._extra_state") or (m.tied and name == "output_layer.weight")
