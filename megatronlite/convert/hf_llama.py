"""HF `LlamaForCausalLM` <-> megatronlite llama: config fields and tensor names.

HF keeps Q, K and V as separate projections; ours is one tensor grouped per KV head (GQA), so
the rule for attention regroups rows. HF applies rotary embeddings to q_proj's output as it is
(rotate_half: the two halves of each head), which is our convention too, so no row permutation
is needed; tests/test_convert_hf.py proves it by comparing logits with transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert.mapping import Mapping, Rule, group_qkv, rename, split_qkv
from megatronlite.convert.model_state import refuse, require

ARCHITECTURE = "LlamaForCausalLM"
BASE_PREFIX = "model."  # checkpoints of the bare LlamaModel lack it
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer older checkpoints saved


def model_config(raw: dict, where: Path) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        refuse(where, f"hidden_act {raw['hidden_act']!r}", "llama with hidden_act silu")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            refuse(where, f"{key}: true", "llama without biases")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        refuse(where, f"rope scaling {rope_type!r}", "llama with plain rotary embeddings (rope_type default)")
    hidden, heads = require(raw, "hidden_size", where), require(raw, "num_attention_heads", where)
    if raw.get("head_dim") not in (None, hidden // heads):
        refuse(where, f"head_dim {raw['head_dim']} != hidden_size / num_attention_heads", "llama with that head_dim")
    return ModelConfig(
        arch="llama",
        num_layers=require(raw, "num_hidden_layers", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        ffn_hidden_size=require(raw, "intermediate_size", where),
        vocab_size=require(raw, "vocab_size", where),
        max_seq_len=require(raw, "max_position_embeddings", where),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        init_std=float(raw.get("initializer_range", 0.02)),
    )


def hf_config(m: ModelConfig) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.ffn_size,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "tie_word_embeddings": m.tied,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4 reads this; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
    }


def mapping(m: ModelConfig) -> Mapping:
    def qkv_to_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
        return (group_qkv(q, k, v, m.kv_heads),)

    def qkv_to_theirs(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_qkv(qkv, m.num_heads, m.kv_heads)

    rules = [rename("embedding.word.weight", "model.embed_tokens.weight")]
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        rules += [
            rename(ours + "attn_norm.weight", theirs + "input_layernorm.weight"),
            Rule(
                (ours + "attention.qkv.weight",),
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                qkv_to_ours,
                qkv_to_theirs,
            ),
            rename(ours + "attention.proj.weight", attn + "o_proj.weight"),
            rename(ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight"),
            rename(ours + "mlp.fc1.weight.gate", theirs + "mlp.gate_proj.weight"),
            rename(ours + "mlp.fc1.weight.up", theirs + "mlp.up_proj.weight"),
            rename(ours + "mlp.fc2.weight", theirs + "mlp.down_proj.weight"),
        ]
    rules.append(rename("final_norm.weight", "model.norm.weight"))
    if not m.tied:
        rules.append(rename("output.weight", "lm_head.weight"))
    return Mapping(rules)


def ignored(m: ModelConfig, name: str) -> bool:
    """Stored tensors that are no weights of ours: old rotary buffers, a tied head saved anyway."""
    return name.endswith(IGNORED_SUFFIXES) or (m.tied and name == "lm_head.weight")
