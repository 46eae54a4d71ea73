"""The experts of HF's mixture-of-experts families <-> `model.moe`: `MixtralForCausalLM`, `Qwen2MoeForCausalLM`,
`Qwen3MoeForCausalLM`.

Each is a Llama-like family (hf_llama.Family) whose MLP is, in some layers, a softmax top-k router over
SwiGLU experts; `Experts` holds what the three differ in: the config keys of the expert count and sizes,
whether the top-k weights are renormalised (Mixtral always; Qwen: `norm_topk_prob`), which layers have experts
(Qwen: layer i unless listed in `mlp_only_layers`, when (i + 1) % `decoder_sparse_step` == 0; dense layers
are `intermediate_size` wide, experts `moe_intermediate_size`), and Qwen2-MoE's shared expert, whose output
is scaled by sigmoid(x . `shared_expert_gate`). Our layer pattern is written back as decoder_sparse_step 1
plus the dense layers in `mlp_only_layers`, which expresses any pattern.

Tensors. Hub checkpoints, and what transformers 5 `save_pretrained` writes (it reverts its load-time
conversion), hold one tensor per expert and projection, [f, h] (down [h, f]):
`model.layers.i.block_sparse_moe.experts.e.{w1,w3,w2}.weight` (Mixtral: gate, up, down) or
`model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight` (Qwen), the router `...gate.weight` [E, h].
In memory transformers 5 fuses them, as ours are stacked: `mlp.experts.gate_up_proj` [E, 2f, h] (gate rows,
then up rows) and `mlp.experts.down_proj` [E, h, f]; a file holding those names (a state_dict saved as is)
is read too. We write the per-expert form, which transformers 4 and 5 both load.

Training settings. `router_aux_loss_coef` becomes `model.moe.aux_loss_coeff` and back, the coefficient
only: transformers adds its balance loss only with `output_router_logits`, pooled over all layers with
assignment shares that sum to top_k, where megatronlite adds one loss per MoE layer with shares that sum
to 1. `router_jitter_noise` (Mixtral's multiplicative noise on the router input in training) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatronlite.config import ModelConfig, MoEConfig
from megatronlite.convert.mapping import Rule, fused_pair, gated_mlp, rename, stacked
from megatronlite.convert.model_state import refuse

Get = Callable[[str], Any]  # a config key as the family's config class reads it (its default when absent)
FUSED = ".experts.gate_up_proj"  # transformers 5's in-memory name of the fused gate and up projections


@dataclass(frozen=True)
class Experts:
    count_key: str  # the number of experts (written)
    size_key: str  # the width of one expert
    names: tuple[str, str, str]  # per-expert tensors of the gate, up and down projections
    block: str  # the MoE module in per-expert checkpoints (Mixtral's `block_sparse_moe`)
    normalize_key: str | None = None  # the key of renormalising the top k (None: always renormalised)
    sparse_layers: bool = False  # decoder_sparse_step and mlp_only_layers choose the MoE layers
    shared_expert: bool = False  # every MoE layer has a shared expert scaled by a sigmoid gate
    count_alias: str | None = None  # the config class's other name of `count_key` (Qwen3-MoE saves this one)

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys of experts this family reads (other families' expert keys are refused)."""
        return (self.count_key, self.count_alias, self.size_key)

    def model_config(self, architecture: str, get: Get, layers: int, where: Path) -> MoEConfig:
        """`model.moe` from a config.json (`get`: its keys, or the config class's defaults where absent)."""
        if get("router_jitter_noise"):
            refuse(
                where, f"router_jitter_noise {get('router_jitter_noise')}", f"{architecture} with router_jitter_noise 0"
            )
        alias = get(self.count_alias) if self.count_alias else None  # None when absent: an alias has no default
        count = get(self.count_key) if alias is None else alias
        moe_layers = self._moe_layers(get, layers) if count else [False] * layers
        if not any(moe_layers):
            return MoEConfig()  # every layer dense
        shared = get("shared_expert_intermediate_size") if self.shared_expert else 0
        if self.shared_expert and not shared:
            refuse(where, "shared_expert_intermediate_size 0", f"{architecture} with a shared expert")
        return MoEConfig(
            num_experts=count,
            top_k=get("num_experts_per_tok"),
            ffn_hidden_size=get(self.size_key),
            layer_freq=1 if all(moe_layers) else [int(x) for x in moe_layers],
            shared_expert_ffn_hidden_size=shared,
            shared_expert_gate=self.shared_expert,
            normalize_top_k=bool(get(self.normalize_key)) if self.normalize_key else True,
            aux_loss_coeff=float(get("router_aux_loss_coef") or 0.0),
        )

    def _moe_layers(self, get: Get, layers: int) -> list[bool]:
        if not self.sparse_layers:
            return [True] * layers
        step, dense = get("decoder_sparse_step"), set(get("mlp_only_layers") or ())
        return [i not in dense and (i + 1) % step == 0 for i in range(layers)]

    def hf_config(self, m: ModelConfig) -> dict:
        moe = m.moe
        layers = moe.layers(m.num_layers)
        out = {
            self.count_key: moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            self.size_key: m.expert_ffn_size,  # Mixtral's is intermediate_size: no dense layer needs it
            "router_aux_loss_coef": moe.aux_loss_coeff,
            "output_router_logits": False,
        }
        if self.normalize_key:
            out[self.normalize_key] = moe.normalize_top_k
        if self.sparse_layers:
            out |= {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, e in enumerate(layers) if not e]}
        if self.shared_expert:
            out["shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
        return out

    def unexpressed(self, m: ModelConfig) -> str | None:
        """The first `model.moe` setting the family cannot hold, as `model.moe.KEY: value`."""
        moe = m.moe
        fixed: dict[str, tuple[Any, ...]] = {
            "router": ("softmax",),
            "scaling_factor": (1.0,),
            "capacity_factor": (None,),  # transformers never drops a token
            "bias_update_rate": (0.0,),  # no selection bias
            "shared_expert_gate": (self.shared_expert,),
        }
        if not self.normalize_key:
            fixed["normalize_top_k"] = (True,)
        if not self.sparse_layers and not all(moe.layers(m.num_layers)):
            return f"model.moe.layer_freq: {moe.layer_freq}"
        if self.shared_expert != bool(moe.shared_expert_ffn_hidden_size):
            return f"model.moe.shared_expert_ffn_hidden_size: {moe.shared_expert_ffn_hidden_size}"
        for key, values in fixed.items():
            if getattr(moe, key) not in values:
                return f"model.moe.{key}: {getattr(moe, key)}"
        return None

    def rules(self, m: ModelConfig, ours: str, layer: str, stored: Collection[str]) -> list[Rule]:
        """The rules of one MoE layer: `ours` is our `layers.i.mlp.`, `layer` HF's `model.layers.i.`."""
        fused = f"{layer}mlp{FUSED}" in stored
        block = f"{layer}{'mlp' if fused else self.block}."
        rules = [rename(ours + "router", block + "gate.weight")]
        if fused:
            rules += [
                fused_pair(ours + "gate", ours + "up", block + FUSED[1:]),
                rename(ours + "down", block + "experts.down_proj"),
            ]
        else:
            experts = range(m.moe.num_experts)
            for part, name in zip(("gate", "up", "down"), self.names):
                rules.append(stacked(ours + part, [f"{block}experts.{e}.{name}.weight" for e in experts]))
        if self.shared_expert:
            rules += gated_mlp(ours + "shared.mlp.", f"{block}shared_expert.", m.bias)
            rules.append(rename(ours + "shared.gate", block + "shared_expert_gate.weight"))
        return rules


MIXTRAL = Experts(
    "num_local_experts", "intermediate_size", ("w1", "w3", "w2"), block="block_sparse_moe", count_alias="num_experts"
)
QWEN = dict(size_key="moe_intermediate_size", names=("gate_proj", "up_proj", "down_proj"), block="mlp")
QWEN2_MOE = Experts("num_experts", normalize_key="norm_topk_prob", sparse_layers=True, shared_expert=True, **QWEN)
QWEN3_MOE = Experts(
    "num_experts", normalize_key="norm_topk_prob", sparse_layers=True, count_alias="num_local_experts", **QWEN
)
