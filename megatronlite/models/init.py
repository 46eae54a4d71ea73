"""Seeded, layout-independent initialization.

Every global tensor gets its own generator, seeded from the run seed and the tensor's global
name, and is drawn in full (one tensor at a time) on the parameter's own device, then sliced to
this rank's shard. So any TP/PP layout starts from exactly the same model as one process on that
kind of device, and no rank ever holds more than one full tensor. On a GPU the draw takes
milliseconds where one CPU thread takes minutes for an 8B model; CPU and CUDA generators draw
different numbers, so a CPU run and a GPU run of one seed start from different (equally good) models.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from megatronlite.config import ModelConfig
from megatronlite.parallel.sharding import Sharding


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_tensor(
    name: str, spec: Sharding, cfg: ModelConfig, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The full (unpadded, unsharded) initial value of global tensor `name`, drawn on `device`."""
    if spec.init == "ones":
        return torch.ones(spec.global_shape, device=device)
    if spec.init == "zeros":
        return torch.zeros(spec.global_shape, device=device)
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if spec.init == "scaled_normal" else cfg.init_std
    generator = _generator(seed, name, torch.device(device))
    return torch.empty(spec.global_shape, device=device).normal_(0.0, std, generator=generator)


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
            full = spec.expert_slice(full_tensor(part_name(source, part), spec, cfg, seed, p.device), *experts)
            pieces.append(spec.local_slice(full, tp_rank, tp_size))
        p.copy_(torch.cat(pieces, dim=spec.dim) if len(pieces) > 1 else pieces[0])
