"""Does a run's layout fit its devices? The planner's figure, checked by `train` (and `train --dry-run`) before
anything is allocated, so an out-of-memory layout is named with its numbers instead of failing minutes in.

The figure is the one `megatronlite plan` prints for this layout (model states from the real sharding on the
meta device, activations for the run's own kernels and recompute), for the heaviest pipeline stage. The
capacity is the GPU's memory on CUDA, and on CPU this node's RAM shared by the workers on it.
"""

from __future__ import annotations

import os

import torch

from megatronlite.config import Config, validate_layout
from megatronlite.models.gpt import RunOptions
from megatronlite.plan.estimate import gib
from megatronlite.plan.memory import Memory, layout_memories


def heaviest_rank(cfg: Config, world_size: int, options: RunOptions) -> tuple[int, Memory]:
    """(pipeline stage, predicted memory) of the rank of `cfg`'s layout on `world_size` workers that needs most."""
    validate_layout(cfg, world_size)
    mems = layout_memories(cfg, world_size, options)
    worst = max(mems, key=lambda s: mems[s].total)
    return worst, mems[worst]


def capacity(device: torch.device, workers_here: int) -> int:
    """Bytes one worker may use: its GPU's memory, or on CPU an equal share of this machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, workers_here)


def describe(memory: Memory) -> str:
    """The total and the three largest parts."""
    parts = sorted(memory.parts().items(), key=lambda kv: -kv[1])[:3]
    return f"{gib(memory.total)} ({', '.join(f'{name} {gib(b)}' for name, b in parts)})"


def memory_report(
    cfg: Config, world_size: int, options: RunOptions, device: torch.device, workers_here: int
) -> tuple[str, bool]:
    """(one line: the predicted need of the heaviest rank against the device's memory, whether it fits)."""
    stage, memory = heaviest_rank(cfg, world_size, options)
    have = capacity(device, workers_here)
    where = f"{device.type} memory per worker ({gib(have)})"
    if memory.total <= have:
        return f"memory: pipeline stage {stage}, the heaviest, is predicted to need {describe(memory)} of {where}", True
    return (
        f"warning: the layout is predicted not to fit: pipeline stage {stage} needs {describe(memory)}, more than "
        f"{where}; expect an out-of-memory error (`megatronlite plan CONFIG --gpus {world_size}` lists the layouts "
        "that fit; more tensor or pipeline parallelism, ZeRO or recompute need less)",
        False,
    )
