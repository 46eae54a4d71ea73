"""Rotary embeddings: the frequencies of each `model.rope_scaling` type, and the cos / sin tables.

The half-rotation convention (HF's and Megatron's): frequencies repeated over both halves of a
head. Long-context scalings change the frequencies (llama3 divides the low ones by `factor` and
blends the middle band; yarn blends interpolated and original frequencies over a ramp of
dimensions) and, for yarn, scale cos and sin by an attention factor. The formulas are those of
transformers' `modeling_rope_utils`, which tests/test_convert_families.py compares logits against.
"""

from __future__ import annotations

import math

import torch

from megatronlite.config import ROPE_SCALING, ModelConfig


def scaling_parameters(cfg: ModelConfig) -> dict:
    """`model.rope_scaling` with every optional key at its default."""
    given = dict(cfg.rope_scaling or {})
    return {**ROPE_SCALING[given["type"]], **given} if given else {}


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    context = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(middle, blended, scaled)


def _yarn(inv_freq: torch.Tensor, p: dict, dim: int, theta: float) -> tuple[torch.Tensor, float]:
    factor, context = p["factor"], p["original_max_position_embeddings"]
    attention_factor = p["attention_factor"] or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(p["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(p["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp.to(inv_freq.device)  # the share of the original frequency
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated, attention_factor


def inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_size / 2], the factor cos and sin are scaled by)."""
    dim, theta = cfg.head_size, cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    p = scaling_parameters(cfg)
    if not p:
        return inv_freq, 1.0
    if p["type"] == "llama3":
        return _llama3(inv_freq, p), 1.0
    return _yarn(inv_freq, p, dim, theta)


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [*positions.shape, head_size] at the given (true) positions."""
    inv_freq, scale = inverse_frequencies(cfg, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale
