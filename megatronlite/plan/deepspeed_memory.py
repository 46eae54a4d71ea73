"""Model-state bytes per GPU under the DeepSpeed engine (`parallel.engine: deepspeed`), by DeepSpeed's own layout.

N: the rank's parameter elements (TP-split, built on the meta device as plan/memory.py builds them); D: the grad
group (dp x cp) that ZeRO partitions over; b: the model's dtype (DeepSpeed casts the model to bf16 / fp16, else
fp32). The model keeps N x b (ZeRO-3: its 1/D partition, none on the GPU with parameter offload); the optimizer an
fp32 master partition and two fp32 Adam moments of N/D each (none on the GPU with optimizer offload); gradients
are N x b under ZeRO-1 (accumulated whole, partitioned at the step) and an N/D partition in the model's dtype under
ZeRO-2/3 (on the CPU with offload); ZeRO-3 also keeps its reduce bucket allocated (measured: bench/bench_zero.py).
Transient: ZeRO-2's two reduce buckets (overlap_comm double-buffers them, freed after the step), and the
all-gather bucket (ZeRO-3: the prefetch bucket of gathered parameters), each `parallel.bucket_mb` as the engine
configures them (engine/deepspeed_zero.py). No autocast copies: the GEMMs read the model's own dtype.
"""

from __future__ import annotations

import torch

from megatronlite.config import Config
from megatronlite.models.gpt import RunOptions
from megatronlite.parallel.stages import build_stages
from megatronlite.plan.layout import mesh_at
from megatronlite.plan.memory import FP32, ModelStates, compute_bytes


def deepspeed_states(cfg: Config, world_size: int, rank: int):
    """The `ModelStates` of `rank` when `cfg` trains on the DeepSpeed engine on `world_size` GPUs."""
    mesh = mesh_at(cfg, world_size, rank)
    options = RunOptions(sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.train.recompute)
    with torch.device("meta"):
        n = sum(p.numel() for _, model in build_stages(cfg, mesh, options) for p in model.parameters())
    d, stage, offload = mesh.role("grad").size, cfg.parallel.zero, cfg.optim.offload_to != "none"
    b = compute_bytes(cfg.train.precision)
    part = -(-n // d)
    bucket = int(cfg.parallel.bucket_mb * 2**20 / FP32) * b
    if stage == 3:
        weights = 0 if offload else part * b
    else:
        weights = n * b
    grads = n * b if stage == 1 else (0 if offload else part * b)
    return ModelStates(
        weights=weights,
        weight_copies=0,
        grads=grads + (bucket if stage == 3 else 0),  # ZeRO-3 keeps its reduce bucket allocated
        optimizer=0 if offload else part * 3 * FP32,  # fp32 master, exp_avg, exp_avg_sq
        gather_buffer=bucket,
        grads_in_flight=2 * bucket if stage == 2 else 0,
    )
