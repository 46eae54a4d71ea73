"""The model-state bytes a layout really allocates, counted on the CPU without processes: what the planner's
prediction is checked against (tests/test_plan.py, exactly) and recorded beside (bench/bench_plan_cpu.py)."""

from __future__ import annotations

import gc

import torch

from megatronlite.config import Config
from megatronlite.optim.adamw import build_adamw
from megatronlite.parallel.data_parallel import DataParallel
from megatronlite.parallel.stages import build_stages
from megatronlite.plan.layout import mesh_at
from megatronlite.plan.memory import _late_sync_names
from megatronlite.train.trainer import run_options


def allocated_states(cfg: Config, world_size: int, rank: int) -> dict[str, int]:
    """Bytes the trainer's own calls allocate on `rank` (its stages, DataParallel, AdamW after one step), by kind
    (weights, grads, optimizer), each storage counted once."""
    mesh = mesh_at(cfg, world_size, rank)
    stages = build_stages(cfg, mesh, run_options(cfg, torch.device("cpu")))
    params = {n: p for _, model in stages for n, p in model.named_parameters()}
    p = cfg.parallel
    late = _late_sync_names(cfg, mesh, params)
    dp = DataParallel(params, mesh.role("grad"), 1, p.zero, p.bucket_mb, late, mesh.role("expert_grad"))
    optimizer, _ = build_adamw(dp.optimizer_params(params), cfg.optim, torch.device("cpu"))
    optimizer.step()
    seen: dict[str, dict[int, int]] = {"weights": {}, "grads": {}, "optimizer": {}}

    def add(kind: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen[kind][storage.data_ptr()] = storage.nbytes()

    stepped = [q for group in optimizer.param_groups for q in group["params"]]
    for q in params.values():
        add("weights", q)
    for q in [*params.values(), *stepped]:
        if q.grad is not None:  # ZeRO-2 keeps none of its own
            add("grads", q.grad)
    for state in optimizer.state.values():
        for t in state.values():
            add("optimizer", t)
    return {kind: sum(sizes.values()) for kind, sizes in seen.items()}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process holds (after a collection), each counted once: what a trained
    engine holds is the difference across its life (bench/bench_zero.py, tests/test_engine_deepspeed.py)."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
