"""The trainer's side of checkpoints: what goes in (weights, Adam states, step, data position,
loss scale, RNG) and putting it back on resume."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from megatronlite.checkpoint import store
from megatronlite.checkpoint.staging import PieceStager
from megatronlite.checkpoint.views import model_pieces, to_dcp
from megatronlite.train.metrics import print_line
from megatronlite.version import versions


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's lazily-made state (zeros) so it can be loaded into or saved before the first step."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(optimizer, "init_state"):  # optimizers that keep their state elsewhere (CPU offload)
                optimizer.init_state(p)
                continue
            state = optimizer.state[p]
            if not state:
                step_device = p.device if fused else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_states(device: torch.device, rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states (CPU, and the GPU's when training on one), keyed per rank."""
    out = {f"rng.cpu.rank{rank}": torch.get_rng_state()}
    if device.type == "cuda":
        out[f"rng.cuda.rank{rank}"] = torch.cuda.get_rng_state(device)
    return out


def layout_of(trainer) -> dict:
    """What must match for RNG states to be restored rather than re-derived."""
    mesh = trainer.mesh
    return {
        "tensor": mesh.tp,
        "pipeline": mesh.pp,
        "data": mesh.dp,
        "world_size": mesh.world_size,
        "device": trainer.device.type,
    }


def _meta(trainer) -> dict:
    return {
        "step": trainer.step,
        # Adam's step count (its bias correction): fewer than `step` when fp16 steps were skipped
        "optimizer_steps": trainer.step - (trainer.scaler.skipped if trainer.scaler else 0),
        "consumed_samples": trainer.consumed_samples,
        "loss_scale": trainer.scaler.state() if trainer.scaler else None,
        "layout": layout_of(trainer),
        "model": trainer.cfg.to_dict()["model"],
        "versions": versions(),
    }


class Checkpointer:
    """Saves the trainer's state, synchronously or (checkpoint.async) in the background.

    Async: the step blocks only while the tensors are copied into CPU buffers made at start-up.
    One writer thread then wraps them for DCP and writes the shards, coordinated over a dedicated
    gloo group so it never interleaves with training collectives; DCP's save returns on rank 0
    after every rank's write is done, and rank 0 commits. A failed write is reported and commits
    nothing.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.root = trainer.run_dir / "checkpoints"
        self.is_async = trainer.cfg.checkpoint.async_save and trainer.cfg.checkpoint.save
        self.group = dist.new_group(backend="gloo") if self.is_async and dist.is_initialized() else None
        self.pending: Future | None = None
        self.writer: ThreadPoolExecutor | None = None
        self.stager: PieceStager | None = None
        if self.is_async:
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            # one stager for the whole run, its CPU buffers allocated now: saves only copy into them
            self.stager = PieceStager(pin_memory=trainer.device.type == "cuda")
            self.stager.reserve(trainer.state_tensors(True, trainer.optimizer_states()))

    def save(self) -> None:
        trainer, mesh, ckpt = self.trainer, self.trainer.mesh, self.trainer.cfg.checkpoint
        self.wait()
        step = trainer.step
        if mesh.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            store.prepare(self.root, step)
        _barrier()
        start = time.perf_counter()
        pieces = trainer.state_tensors(True, trainer.optimizer_states())
        rng = rng_states(trainer.device, mesh.rank)
        tmp = store.temp_dir(self.root, step)
        meta, config_yaml = _meta(trainer), trainer.resolved_config_yaml()

        def write(pieces) -> None:
            store.write_shards(tmp, {**to_dcp(pieces, mesh), **rng}, self.group)
            fault_hook("save", step, mesh.rank)
            if mesh.rank == 0:
                final = store.commit(self.root, step, meta, config_yaml, ckpt.keep, ckpt.keep_every)
                written = time.perf_counter() - start
                print_line(f"saved checkpoint {final} ({'async, ' if self.is_async else ''}written in {written:.2f} s)")

        if not self.is_async:
            write(pieces)
            _barrier()
            return
        staged = self.stager.stage(pieces)
        self.pending = self.writer.submit(write, staged)
        blocked = time.perf_counter() - start
        if mesh.rank == 0:
            print_line(f"checkpoint step {step}: training blocked {blocked:.3f} s while staging; writing in background")

        def report(future: Future) -> None:
            error = future.exception()
            if error is not None:
                print_line(
                    f"megatronlite: async checkpoint of step {step} failed on rank {mesh.rank} "
                    f"({type(error).__name__}: {error}); the previous checkpoint is kept"
                )

        self.pending.add_done_callback(report)

    def wait(self) -> None:
        """Block until the background save (if any) has finished and been committed."""
        if self.pending is None:
            return
        done = self.pending
        self.pending = None
        try:
            done.result()
        except Exception:  # noqa: BLE001 - already reported by the callback; training goes on
            pass
        _barrier()


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
    return store.find_step_dir(load)  # the config checked that the path exists


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
    same_layout = meta.get("layout") == layout_of(trainer)
    rng = rng_states(trainer.device, mesh.rank)
    if same_layout:
        tensors.update(rng)
    store.read_shards(step_dir, tensors)
    trainer.restore_optimizer_states(optimizer_states)
    if same_layout:
        torch.set_rng_state(rng[f"rng.cpu.rank{mesh.rank}"])
        if trainer.device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"rng.cuda.rank{mesh.rank}"], trainer.device)
    else:  # re-derived deterministically from the seed and step
        torch.manual_seed(trainer.cfg.train.seed + meta["step"])
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            trainer.optimizer.state[p]["step"].fill_(float(meta.get("optimizer_steps", meta["step"])))
    trainer.step = meta["step"]
    trainer.consumed_samples = meta["consumed_samples"]
    if trainer.scaler and meta.get("loss_scale"):
        trainer.scaler.load_state(meta["loss_scale"])
    if mesh.rank == 0:
        print_line(f"resumed from {step_dir} at step {trainer.step}")


def _load_weights_only(trainer, step_dir: Path) -> None:
    """A converted or exported model: its weights, then training from step 0 with a fresh optimizer."""
    pieces = model_pieces(trainer.params, trainer.mesh, for_save=False)
    store.check_shapes(step_dir, {k: v.global_shape for k, v in pieces.items()})
    store.read_shards(step_dir, to_dcp(pieces, trainer.mesh))
    if trainer.mesh.rank == 0:
        print_line(f"initialized weights from {step_dir} (weights only: optimizer and data start fresh)")
