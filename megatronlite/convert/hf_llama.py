"""HF's Llama-like families <-> megatronlite: `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`MistralForCausalLM`, and their mixtures of experts `MixtralForCausalLM`, `Qwen2MoeForCausalLM`,
`Qwen3MoeForCausalLM` (whose experts hf_moe.py describes).

In transformers these are one decoder that differs in a few config keys: which biases exist and
which keys switch them, whether q and k are normed per head, how a sliding window is declared,
whether `head_dim` is a key, and the config class's defaults for absent keys. `Family` holds exactly
those differences; the rules (tensor names, GQA regrouping, rope parameters) are shared. Every feature
is read from the config's keys, never from the family's name, and anything the keys say that our
model cannot compute exactly is refused with the key named.

HF keeps Q, K and V as separate projections; ours is one tensor grouped per KV head (GQA), so
the attention rules regroup rows (weights and biases alike). HF applies rotary embeddings to
q_proj's output as it is (rotate_half: the two halves of each head), which is our convention too,
so no row permutation is needed; tests/test_convert_hf.py proves it by comparing logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatronlite.config import ROPE_SCALING, ModelConfig, MoEConfig
from megatronlite.convert import hf_features, hf_moe
from megatronlite.convert.fields import require
from megatronlite.convert.mapping import Mapping, Rule, gated_mlp, group_qkv, rename, split_qkv
from megatronlite.convert.model_state import refuse

Biases = dict[tuple[bool, bool], dict[str, bool]]  # (qkv_bias, bias) -> the HF keys that say so
# LlamaConfig's defaults for absent keys; a family's own differ where `Family.defaults` says
LLAMA_DEFAULTS: dict[str, Any] = dict(
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
ROPE_TYPES = ("llama3", "yarn")  # HF rope types we compute (models/rope.py); others are refused
# keys of features we lack: any true value is refused (soft-capping; experts in a family without them)
FOREIGN_KEYS = (
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_intermediate_size",
)
ATTENTION_KINDS = ("full_attention", "sliding_attention")
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer older checkpoints saved


def from_max_window_layers(i: int, max_window_layers: int) -> bool:
    """Qwen2's and Qwen3's windowed layers: those from `max_window_layers` on."""
    return i >= max_window_layers


def even_below_max_window_layers(i: int, max_window_layers: int) -> bool:
    """Qwen2-MoE's windowed layers: every other one from layer 0, below `max_window_layers`."""
    return i % 2 == 0 and i < max_window_layers


@dataclass(frozen=True)
class Family:
    ARCHITECTURE: str
    PRESET: str  # our `model.arch`, and HF's model_type unless `model_type` says otherwise
    biases: Biases
    qk_norm: bool = False  # q_norm / k_norm in every layer (Qwen3)
    # none | all (`sliding_window` in every layer) | switch (`use_sliding_window` windows every layer)
    # | per_layer (use_sliding_window, then layer_types, else `sliding_layer(i, max_window_layers)`)
    window: str = "none"
    sliding_layer: Callable[[int, int], bool] = from_max_window_layers
    head_dim_key: bool = True  # the config class has `head_dim` (Qwen2's has not: written only at its default)
    defaults: dict[str, Any] = field(default_factory=dict)  # the config class's defaults that differ from Llama's
    BASE_PREFIX: str = "model."  # checkpoints of the bare base model lack it
    model_type: str = ""  # HF's model_type where it is not PRESET
    experts: hf_moe.Experts | None = None  # a mixture of experts in some or all layers

    def _get(self, raw: dict, key: str) -> Any:
        """A config key as the family's config class reads it: absent keys take the class default."""
        return raw.get(key, self.defaults.get(key, LLAMA_DEFAULTS.get(key)))

    def model_config(self, raw: dict, where: Path) -> ModelConfig:
        for key in FOREIGN_KEYS:
            if raw.get(key) and key not in (self.experts.keys if self.experts else ()):
                refuse(where, f"{key}: {raw[key]}", f"{self.ARCHITECTURE} without {key}")
        if self._get(raw, "hidden_act") != "silu":
            refuse(where, f"hidden_act {raw['hidden_act']!r}", f"{self.ARCHITECTURE} with hidden_act silu")
        hidden, heads = require(raw, "hidden_size", where), require(raw, "num_attention_heads", where)
        layers, positions = require(raw, "num_hidden_layers", where), require(raw, "max_position_embeddings", where)
        head_dim = self._get(raw, "head_dim") or hidden // heads
        qkv_bias, bias = self._biases(raw, where)
        rope_theta, rope_scaling = rope_config(raw, positions, where, self._get({}, "rope_theta"))
        moe = MoEConfig()
        if self.experts:
            moe = self.experts.model_config(self.ARCHITECTURE, functools.partial(self._get, raw), layers, where)
        return ModelConfig(
            arch=self.PRESET,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=self._get(raw, "num_key_value_heads") or heads,
            head_dim=None if head_dim == hidden / heads else head_dim,  # None: hidden / heads, as our default
            ffn_hidden_size=require(raw, "intermediate_size", where),  # dense layers' (Mixtral: the experts')
            vocab_size=require(raw, "vocab_size", where),
            max_seq_len=positions,
            norm="rmsnorm",
            norm_eps=float(self._get(raw, "rms_norm_eps")),
            activation="swiglu",
            position="rope",
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bias=bias,
            qkv_bias=qkv_bias,
            qk_norm=self.qk_norm,
            sliding_window=self._window(raw, layers, where),
            tie_embeddings=bool(self._get(raw, "tie_word_embeddings")),
            init_std=float(self._get(raw, "initializer_range")),
            moe=moe,
        )

    def _biases(self, raw: dict, where: Path) -> tuple[bool, bool]:
        said = {key: bool(self._get(raw, key)) for keys in self.biases.values() for key in keys}
        for pair, keys in self.biases.items():
            if all(said[key] == value for key, value in keys.items()):
                return pair
        key = next(k for k, on in said.items() if on)
        choices = " or ".join(", ".join(f"{k} {v}" for k, v in keys.items()) for keys in self.biases.values())
        refuse(where, f"{key}: true", f"{self.ARCHITECTURE} with {choices}")

    def _window(self, raw: dict, layers: int, where: Path) -> int | None:
        """The one window of every layer (None: full causal attention), as the family's transformers class reads it."""
        types = raw.get("layer_types")
        if types and (len(set(types)) > 1 or types[0] not in ATTENTION_KINDS):
            refuse(where, f"layer_types {sorted(set(types))}", f"{self.ARCHITECTURE} with one attention kind in all")
        if self.window == "none":
            return None
        if self.window in ("per_layer", "switch") and not raw.get("use_sliding_window"):
            return None
        if self.window == "per_layer":
            last = self._get(raw, "max_window_layers")
            pattern = (ATTENTION_KINDS[self.sliding_layer(i, last)] for i in range(layers))
            kinds = set(types or pattern)
            if len(kinds) > 1:
                refuse(where, f"max_window_layers {last} of {layers}", f"{self.ARCHITECTURE} windowed in all or none")
            if kinds != {"sliding_attention"}:
                return None
        return self._get(raw, "sliding_window")

    def hf_config(self, m: ModelConfig) -> dict:
        return {
            "architectures": [self.ARCHITECTURE],
            "model_type": self.model_type or self.PRESET,
            "num_hidden_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.kv_heads,
            **({"head_dim": m.head_size} if self.head_dim_key else {}),
            "intermediate_size": m.ffn_size,
            "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_seq_len,
            "tie_word_embeddings": m.tied,
            "rms_norm_eps": m.norm_eps,
            **rope_fields(m),
            **self.biases[(m.qkv_bias, m.bias)],
            **self._window_fields(m),
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": m.init_std,
            **(self.experts.hf_config(m) if self.experts else {}),
        }

    def _window_fields(self, m: ModelConfig) -> dict:
        w = m.sliding_window
        if self.window == "all":
            return {"sliding_window": w}
        if self.window == "switch":
            return {"use_sliding_window": w is not None, "sliding_window": w}
        if self.window == "per_layer":
            kind = ATTENTION_KINDS[w is not None]
            layers = {"max_window_layers": 0 if w else m.num_layers, "layer_types": [kind] * m.num_layers}
            return {"use_sliding_window": w is not None, "sliding_window": w, **layers}
        return {}

    def unexpressed(self, m: ModelConfig) -> str | None:
        allowed = {
            "norm": ("rmsnorm",),
            "activation": ("swiglu",),
            "position": ("rope",),
            "rope_scaling": (None, *ROPE_TYPES),
            "qkv_bias, bias": tuple(self.biases),
            "qk_norm": (self.qk_norm,),
        }
        if self.window == "none":
            allowed["sliding_window"] = (None,)
        if not self.head_dim_key:
            allowed["head_dim"] = (None,)
        if not self.experts:
            allowed["moe.num_experts"] = (None,)
        elif not m.moe.num_experts:
            return "model.moe.num_experts: 0"
        return hf_features.unexpressed(m, allowed) or (self.experts and self.experts.unexpressed(m))

    def mapping(self, m: ModelConfig, stored: Collection[str] = ()) -> Mapping:
        def qkv_to_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
            return (group_qkv(q, k, v, m.kv_heads),)

        def qkv_to_theirs(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return split_qkv(qkv, m.num_heads, m.kv_heads)

        rules = [rename("embedding.word.weight", "model.embed_tokens.weight")]
        for i, experts in enumerate(m.moe.layers(m.num_layers)):
            ours, theirs = f"layers.{i}.", f"model.layers.{i}."
            attn = theirs + "self_attn."
            rules.append(rename(ours + "attn_norm.weight", theirs + "input_layernorm.weight"))
            for s in suffixes(m.qkv_bias):
                qkv = tuple(f"{attn}{p}_proj.{s}" for p in "qkv")
                rules.append(Rule((ours + f"attention.qkv.{s}",), qkv, qkv_to_ours, qkv_to_theirs))
            if m.qk_norm:
                rules += [rename(ours + f"attention.{p}_norm.weight", attn + f"{p}_norm.weight") for p in "qk"]
            rules.append(rename(ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight"))
            rules += [rename(ours + f"attention.proj.{s}", attn + f"o_proj.{s}") for s in suffixes(m.bias)]
            if experts:
                rules += self.experts.rules(m, ours + "mlp.", theirs, stored)
            else:
                rules += gated_mlp(ours + "mlp.", theirs + "mlp.", m.bias)
        rules.append(rename("final_norm.weight", "model.norm.weight"))
        if not m.tied:
            rules.append(rename("output.weight", "lm_head.weight"))
        return Mapping(rules)

    def ignored(self, m: ModelConfig, name: str) -> bool:
        """Stored tensors that are no weights of ours: old rotary buffers, a tied head saved anyway."""
        return name.endswith(IGNORED_SUFFIXES) or (m.tied and name == "lm_head.weight")


def suffixes(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def rope_config(
    raw: dict, positions: int, where: Path, default_theta: float = LLAMA_DEFAULTS["rope_theta"]
) -> tuple[float, dict | None]:
    """(rope_theta, our `rope_scaling`) from an HF config, read as transformers 5 reads it (`rope_scaling`, the
    v4 name, first; absent keys from the top level or the config class's `default_theta`); anything else it
    would compute is refused."""
    params = {k: v for k, v in (raw.get("rope_scaling") or raw.get("rope_parameters") or {}).items() if v is not None}
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", raw.get("rope_theta") or default_theta))
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        refuse(where, f"partial_rotary_factor {partial}", "rotary embeddings over the whole head")
    if params.pop("truncate", True) is not True:
        refuse(where, "rope_parameters.truncate: false", "yarn with its correction range truncated (the default)")
    if kind != "default" and kind not in ROPE_TYPES:
        refuse(where, f"rope_parameters.rope_type {kind!r}", f"rope types default, {', '.join(ROPE_TYPES)}")
    keys = ROPE_SCALING.get(kind, {})
    extra = [k for k in params if k not in keys]
    if extra:
        refuse(where, f"rope_parameters.{extra[0]}", f"{kind} rope with {', '.join(keys) or 'rope_theta alone'}")
    if kind == "default":
        return theta, None
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    scaling = {"type": kind, **params, "original_max_position_embeddings": original or positions}
    if kind == "yarn" and "factor" not in scaling:  # transformers: the ratio of the two context lengths
        scaling["factor"] = positions / scaling["original_max_position_embeddings"]
    for key in keys:
        if keys[key] is ...:
            require(scaling, key, where)
    return theta, scaling


def rope_fields(m: ModelConfig) -> dict:
    """The rope keys of config.json: `rope_parameters` for transformers 5, `rope_theta` and `rope_scaling` for 4."""
    scaling = {k: v for k, v in (m.rope_scaling or {}).items() if k != "type" and v is not None}
    if not m.rope_scaling:
        return {"rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}}
    hf = {"rope_type": m.rope_scaling["type"], **scaling}
    return {"rope_theta": m.rope_theta, "rope_scaling": hf, "rope_parameters": {**hf, "rope_theta": m.rope_theta}}


LLAMA = Family(
    "LlamaForCausalLM",
    "llama",
    biases={
        (False, False): {"attention_bias": False, "mlp_bias": False},
        (True, True): {"attention_bias": True, "mlp_bias": True},
    },
)
QWEN2 = Family(
    "Qwen2ForCausalLM",
    "qwen2",
    biases={(True, False): {}},  # q, k and v always have biases, o_proj and the MLP never
    window="per_layer",
    head_dim_key=False,
    defaults=dict(num_key_value_heads=32, sliding_window=4096, max_window_layers=28),
)
QWEN3 = Family(
    "Qwen3ForCausalLM",
    "qwen3",
    biases={(False, False): {"attention_bias": False}},  # attention_bias would add o_proj's without the MLP's
    qk_norm=True,
    window="per_layer",
    defaults=dict(num_key_value_heads=32, head_dim=128, sliding_window=4096, max_window_layers=28),
)
MISTRAL = Family(
    "MistralForCausalLM",
    "mistral",
    biases={(False, False): {}},
    window="all",
    defaults=dict(num_key_value_heads=8, sliding_window=4096),
)
# the config classes' defaults of the experts' keys
MOE_DEFAULTS = dict(router_aux_loss_coef=0.001, decoder_sparse_step=1, norm_topk_prob=False, router_jitter_noise=0.0)
MIXTRAL = Family(
    "MixtralForCausalLM",
    "mistral",
    biases={(False, False): {}},
    window="all",
    defaults=dict(
        MOE_DEFAULTS,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1e6,  # MixtralConfig.default_theta
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    model_type="mixtral",
    experts=hf_moe.MIXTRAL,
)
QWEN2_MOE = Family(
    "Qwen2MoeForCausalLM",
    "qwen2",
    biases={(True, False): {"qkv_bias": True}, (False, False): {"qkv_bias": False}},  # o_proj and MLPs never
    window="per_layer",
    sliding_layer=even_below_max_window_layers,
    defaults=dict(
        MOE_DEFAULTS,
        qkv_bias=True,
        num_key_value_heads=16,
        sliding_window=4096,
        max_window_layers=28,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
    ),
    model_type="qwen2_moe",
    experts=hf_moe.QWEN2_MOE,
)
QWEN3_MOE = Family(
    "Qwen3MoeForCausalLM",
    "qwen3",
    biases={(False, False): {"attention_bias": False}},  # attention_bias would add o_proj's without the MLP's
    qk_norm=True,
    window="switch",
    defaults=dict(
        MOE_DEFAULTS,
        num_key_value_heads=4,
        sliding_window=4096,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
    model_type="qwen3_moe",
    experts=hf_moe.QWEN3_MOE,
)
FAMILIES = (LLAMA, QWEN2, QWEN3, MISTRAL, MIXTRAL, QWEN2_MOE, QWEN3_MOE)
