"""What an HF family can express, in terms of our model features; shared by every HF family module.

Export picks the HF architecture by features, not by `model.arch`: each family states the values of
each feature it can write (`Allowed`), and `unexpressed` names the first feature a model has that the
family cannot hold, so a model is never written as a family that would silently compute something else.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from megatronlite.config import ModelConfig
from megatronlite.convert.mapping import Mapping

Allowed = dict[str, tuple[Any, ...]]  # feature (a `features` key) -> the values a family can express


class HFFamily(Protocol):
    """One HF architecture: its config fields and tensor names both ways."""

    ARCHITECTURE: str  # config.json's architectures[0], and the transformers class
    PRESET: str  # our `model.arch` for it
    BASE_PREFIX: str  # the names' prefix that checkpoints of the bare base model lack

    def model_config(self, raw: dict, where: Path) -> ModelConfig: ...

    def hf_config(self, m: ModelConfig) -> dict: ...

    def mapping(self, m: ModelConfig, stored: Collection[str] = ()) -> Mapping:
        """The rules for `m`; `stored`: the names a checkpoint being read holds, where a family has two layouts."""

    def ignored(self, m: ModelConfig, name: str) -> bool: ...

    def unexpressed(self, m: ModelConfig) -> str | None: ...


def features(m: ModelConfig) -> dict[str, Any]:
    """The model's features as families differ in them; None where a model has the plain choice."""
    return {
        "norm": m.norm,
        "activation": m.activation,
        "position": m.position,
        "rope_scaling": (m.rope_scaling or {}).get("type"),
        "qkv_bias, bias": (m.qkv_bias, m.bias),
        "qk_norm": m.qk_norm,
        "sliding_window": m.sliding_window,
        "head_dim": None if m.head_size * m.num_heads == m.hidden_size else m.head_size,
        "num_kv_heads": None if m.kv_heads == m.num_heads else m.kv_heads,
        "moe.num_experts": m.moe.num_experts or None,  # a dense model has none; the MoE families check the rest
    }


def unexpressed(m: ModelConfig, allowed: Allowed) -> str | None:
    """The first feature of `m` whose value is not among the family's `allowed` ones, as `model.KEY: value`."""
    for key, value in features(m).items():
        if key in allowed and value not in allowed[key]:
            return f"model.{key}: {value}"
    return None
