"""Seeded, layout-independent initialization.

Every global tensor gets its own generator, seeded from the run seed and the tensor's global
name, and is drawn in full (one tensor at a time), then sliced to this rank's shard. So any
TP/PP layout starts from exactly the same model as one process, and no rank ever holds more
than one full tensor.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from megatronlite.config import ModelConfig
from megatronlite.parallel.sharding import Sharding


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_tensor(name: str, spec: Sharding, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (unpadded, unsharded) initial value of global tensor `name`."""
    if spec.init == "ones":
        return torch.ones(spec.global_shape)
    if spec.init == "zeros":
        return torch.zeros(spec.global_shape)
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if spec.init == "scaled_normal" else cfg.init_std
    return torch.empty(spec.global_shape).normal_(0.0, std, generator=_generator(seed, name))


def part_name(param_name: str, part: str) -> str:
    """The global name of one fused part: `layers.0.mlp.fc1.weight` + `gate` -> `layers.0.mlp.fc1.weight.gate`."""
    return f"{param_name}.{part}" if part else param_name


@torch.no_grad()
def init_parameters(
    model: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int = 0, tp_size: int = 1, experts: tuple[int, int] = (0, 1)
) -> None:
    """Fill every parameter with its slice of its seeded full tensor; `experts`: (rank, size) of expert parallelism."""
    for name, p in model.named_parameters():
        spec: Sharding = p.sharding
        source = spec.alias or name
        pieces = []
        for part in spec.part_names():
            full = spec.expert_slice(full_tensor(part_name(source, part), spec, cfg, seed), *experts)
            pieces.append(spec.local_slice(full, tp_rank, tp_size))
        p.copy_(torch.cat(pieces, dim=spec.dim) if len(pieces) > 1 else pieces[0])
