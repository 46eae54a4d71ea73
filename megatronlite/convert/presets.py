"""The `arch` a converted model names: a converter reads every feature from the source, so `arch` only
labels the family the model is closest to (what a user reading the config recognises); it changes nothing.
"""

from __future__ import annotations

from typing import Any

from megatronlite.config import FAMILIES, FEATURE_DEFAULTS, ModelConfig


def closest_arch(features: dict[str, Any]) -> str:
    """The family whose preset shares the most of `features` (the first such, llama, on a tie)."""

    def shared(family: str) -> int:
        preset = ModelConfig(arch=family)
        return sum(getattr(preset, key) == value for key, value in features.items() if key in FEATURE_DEFAULTS)

    return max(FAMILIES, key=shared)
