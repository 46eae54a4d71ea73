"""HF `GPT2LMHeadModel` <-> megatronlite gpt2: config fields and tensor names.

GPT-2's linear layers are `Conv1D`, weights stored [in, out], so every one is transposed. Its
fused `c_attn` holds all of Q, then all of K, then all of V; ours groups rows per head
([q_h; k_h; v_h] for each head h, GQA with one query head per group), so the rule regroups
rows as it transposes. The output layer is the word embedding (tied) unless the config says not.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert import hf_features
from megatronlite.convert.fields import NUMBER, POSITIVE, require
from megatronlite.convert.mapping import Mapping, Rule, group_qkv, rename, split_qkv, transposed
from megatronlite.convert.model_state import refuse

ARCHITECTURE = "GPT2LMHeadModel"
PRESET = "gpt2"
BASE_PREFIX = "transformer."  # checkpoints of the bare GPT2Model (the original gpt2 files) lack it
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # our gpt2 uses GELU's tanh approximation
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints saved
# GPT-2's features (hf_features.features): every one is fixed but the output layer's tying
ALLOWED: hf_features.Allowed = {
    "norm": ("layernorm",),
    "activation": ("gelu",),
    "position": ("learned",),
    "rope_scaling": (None,),
    "qkv_bias, bias": ((True, True),),
    "qk_norm": (False,),
    "sliding_window": (None,),
    "head_dim": (None,),
    "num_kv_heads": (None,),
    "moe.num_experts": (None,),
}


def model_config(raw: dict, where: Path) -> ModelConfig:
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        refuse(where, f"activation_function {act!r}", f"gpt2 with {' or '.join(TANH_GELUS)}")
    if not raw.get("scale_attn_weights", True) or raw.get("scale_attn_by_inverse_layer_idx"):
        refuse(where, "attention scaling other than 1/sqrt(head_dim)", "gpt2 with scale_attn_weights only")
    if raw.get("add_cross_attention"):
        refuse(where, "add_cross_attention: true", "decoder-only gpt2")
    size = functools.partial(require, raw, where=where, kind=POSITIVE)
    hidden, heads = size("n_embd"), size("n_head")
    return ModelConfig(
        arch=PRESET,
        num_layers=size("n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=None,  # hidden / heads
        ffn_hidden_size=size("n_inner", default=4 * hidden),
        vocab_size=size("vocab_size"),
        max_seq_len=size("n_positions"),
        norm="layernorm",
        norm_eps=float(require(raw, "layer_norm_epsilon", where, NUMBER, default=1e-5)),
        activation="gelu",
        position="learned",
        bias=True,
        qkv_bias=True,
        qk_norm=False,
        sliding_window=None,
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        init_std=float(require(raw, "initializer_range", where, NUMBER, default=0.02)),
    )


def unexpressed(m: ModelConfig) -> str | None:
    return hf_features.unexpressed(m, ALLOWED)


def hf_config(m: ModelConfig) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
        "n_layer": m.num_layers,
        "n_embd": m.hidden_size,
        "n_head": m.num_heads,
        "n_inner": m.ffn_size,
        "vocab_size": m.vocab_size,
        "n_positions": m.max_seq_len,
        "tie_word_embeddings": m.tied,
        "layer_norm_epsilon": m.norm_eps,
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "resid_pdrop": 0.0,  # megatronlite trains without dropout
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def mapping(m: ModelConfig, stored: Collection[str] = ()) -> Mapping:
    heads = m.num_heads

    def c_attn_to_ours(t: torch.Tensor) -> tuple[torch.Tensor]:  # [h, 3h] (or bias [3h]) -> grouped rows
        rows = t.t() if t.dim() == 2 else t
        return (group_qkv(*rows.chunk(3), heads),)

    def c_attn_to_theirs(qkv: torch.Tensor) -> tuple[torch.Tensor]:
        rows = torch.cat(split_qkv(qkv, heads, heads))
        return (rows.t() if rows.dim() == 2 else rows,)

    rules = [
        rename("embedding.word.weight", "transformer.wte.weight"),
        rename("embedding.position", "transformer.wpe.weight"),
    ]
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for s in ("weight", "bias"):
            rules += [
                rename(ours + f"attn_norm.{s}", theirs + f"ln_1.{s}"),
                Rule((ours + f"attention.qkv.{s}",), (theirs + f"attn.c_attn.{s}",), c_attn_to_ours, c_attn_to_theirs),
            ]
        rules += [
            transposed(ours + "attention.proj.weight", theirs + "attn.c_proj.weight"),
            rename(ours + "attention.proj.bias", theirs + "attn.c_proj.bias"),
            rename(ours + "mlp_norm.weight", theirs + "ln_2.weight"),
            rename(ours + "mlp_norm.bias", theirs + "ln_2.bias"),
            transposed(ours + "mlp.fc1.weight", theirs + "mlp.c_fc.weight"),
            rename(ours + "mlp.fc1.bias", theirs + "mlp.c_fc.bias"),
            transposed(ours + "mlp.fc2.weight", theirs + "mlp.c_proj.weight"),
            rename(ours + "mlp.fc2.bias", theirs + "mlp.c_proj.bias"),
        ]
    rules += [rename(f"final_norm.{s}", f"transformer.ln_f.{s}") for s in ("weight", "bias")]
    if not m.tied:
        rules.append(rename("output.weight", "lm_head.weight"))
    return Mapping(rules)


def ignored(m: ModelConfig, name: str) -> bool:
    """Stored tensors that are no weights of ours: causal-mask buffers, a tied head saved anyway."""
    return name.endswith(IGNORED_SUFFIXES) or (m.tied and name == "lm_head.weight")
