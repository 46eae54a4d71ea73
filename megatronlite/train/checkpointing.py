"""The trainer's side of checkpoints: what goes in (weights, Adam states, step, data position,
loss scale, RNG) and putting it back on resume."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import model_pieces, to_dcp
from megatronlite.errors import UserError
from megatronlite.train.metrics import print_line
from megatronlite.version import versions


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's lazily-made state (zeros) so it can be loaded into or saved before the first step."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                step_device = p.device if fused else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_key(rank: int) -> str:
    return f"rng.cpu.rank{rank}"


def save(trainer) -> Path:
    mesh, cfg = trainer.mesh, trainer.cfg
    root = trainer.run_dir / "checkpoints"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        store.prepare(root, trainer.step)
    _barrier()
    tensors = to_dcp(trainer.state_tensors(True, trainer.optimizer_states()), mesh)
    tensors[_rng_key(mesh.rank)] = torch.get_rng_state()
    store.write_shards(store.temp_dir(root, trainer.step), tensors)
    fault_hook("save", trainer.step, mesh.rank)
    _barrier()
    final = root / store.step_name(trainer.step)
    if mesh.rank == 0:
        meta = {
            "step": trainer.step,
            "consumed_samples": trainer.consumed_samples,
            "loss_scale": trainer.scaler.scale if trainer.scaler else None,
            "layout": {"tensor": mesh.tp, "pipeline": mesh.pp, "data": mesh.dp, "world_size": mesh.world_size},
            "model": cfg.to_dict()["model"],
            "versions": versions(),
        }
        final = store.commit(
            root, trainer.step, meta, trainer.resolved_config_yaml(), cfg.checkpoint.keep, cfg.checkpoint.keep_every
        )
        print_line(f"saved checkpoint {final}")
    _barrier()
    return final


def fault_hook(where: str, step: int, rank: int) -> None:
    """Fault injection for tests: MEGATRONLITE_FAULT=WHERE:STEP[@RANK].

    `save:N` SIGKILLs the process in the middle of saving step N (shards written, nothing
    committed); `step:N` raises in training step N. Without @RANK every rank is hit.
    """
    fault = os.environ.get("MEGATRONLITE_FAULT", "")
    target, _, only_rank = fault.partition("@")
    if target != f"{where}:{step}" or (only_rank and int(only_rank) != rank):
        return
    if where == "save":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {where} {step} on rank {rank}")


def resolve_load(trainer) -> Path | None:
    """The step directory to resume from, per `checkpoint.load`: auto, null, or a path."""
    load = trainer.cfg.checkpoint.load
    if load is None:
        return None
    if load == "auto":
        return store.latest_complete(trainer.run_dir / "checkpoints")
    if not Path(load).exists():
        raise UserError(f"checkpoint.load: path does not exist: {load}")
    return store.find_step_dir(load)


def maybe_resume(trainer) -> None:
    step_dir = resolve_load(trainer)
    if step_dir is None:
        return
    meta = store.read_meta(step_dir)
    if meta.get("weights_only"):
        _load_weights_only(trainer, step_dir)
        return
    optimizer_states = trainer.optimizer_states()
    pieces = trainer.state_tensors(False, optimizer_states)
    store.check_shapes(step_dir, {k: v.global_shape for k, v in pieces.items()})
    tensors = to_dcp(pieces, trainer.mesh)
    mesh = trainer.mesh
    layout = {"tensor": mesh.tp, "pipeline": mesh.pp, "data": mesh.dp, "world_size": mesh.world_size}
    same_layout = meta.get("layout") == layout
    rng = torch.get_rng_state()
    if same_layout:
        tensors[_rng_key(mesh.rank)] = rng
    store.read_shards(step_dir, tensors)
    trainer.restore_optimizer_states(optimizer_states)
    if same_layout:
        torch.set_rng_state(rng)
    else:  # re-derived deterministically from the seed and step
        torch.manual_seed(trainer.cfg.train.seed + meta["step"])
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            trainer.optimizer.state[p]["step"].fill_(float(meta["step"]))
    trainer.step = meta["step"]
    trainer.consumed_samples = meta["consumed_samples"]
    if trainer.scaler and meta.get("loss_scale"):
        trainer.scaler.scale = meta["loss_scale"]
    if mesh.rank == 0:
        print_line(f"resumed from {step_dir} at step {trainer.step}")


def _load_weights_only(trainer, step_dir: Path) -> None:
    """A converted or exported model: its weights, then training from step 0 with a fresh optimizer."""
    pieces = model_pieces(trainer.params, trainer.mesh, for_save=False)
    store.check_shapes(step_dir, {k: v.global_shape for k, v in pieces.items()})
    store.read_shards(step_dir, to_dcp(pieces, trainer.mesh))
    if trainer.mesh.rank == 0:
        print_line(f"initialized weights from {step_dir} (weights only: optimizer and data start fresh)")
