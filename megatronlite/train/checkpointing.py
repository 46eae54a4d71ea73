"""The trainer's side of checkpoints: what goes in (weights, Adam states, step, data position,
loss scale, RNG) and putting it back on resume."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatronlite.checkpoint import store, weights
from megatronlite.checkpoint.staging import PieceStager
from megatronlite.checkpoint.views import GlobalPiece
from megatronlite.config import Config
from megatronlite.errors import UserError
from megatronlite.parallel.mesh import new_group
from megatronlite.train.metrics import print_line
from megatronlite.train.restarts import restart_count
from megatronlite.train.stateful import all_pieces, all_values
from megatronlite.version import versions


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
        "context": mesh.cp,
        "data": mesh.dp,
        "world_size": mesh.world_size,
        "device": trainer.device.type,
    }


def _meta(trainer) -> dict:
    """meta.json: every stateful part's values, and what describes the run (layout, model, versions)."""
    extra = {"layout": layout_of(trainer), "model": trainer.cfg.to_dict()["model"], "versions": versions()}
    return {**all_values(trainer.stateful_parts()), **extra}


class Checkpointer:
    """Saves the trainer's state, synchronously or (checkpoint.async) in the background.

    Every rank coordinates saves (the barrier before, DCP's plan exchange, the vote after) over a
    dedicated gloo group made at start-up: ranks waiting for a slow write or fsync wait on the host,
    never inside an NCCL collective of the training group, and async writes never interleave with
    training collectives. Async: the step blocks only while the tensors are copied into CPU buffers
    made at start-up; one writer thread then plans and writes them through DCP; DCP's save returns
    on rank 0 after every rank's write is done, and rank 0 commits.

    A failed write (a full disk, a lost mount) commits nothing: rank 0 removes the temporary
    directory, reports one line with the bytes needed and free, and the last good checkpoint stays
    `latest`. Training goes on, or stops with `checkpoint.required: true`.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.root = trainer.run_dir / "checkpoints"
        self.is_async = trainer.cfg.checkpoint.async_save and trainer.cfg.checkpoint.save
        self.group = new_group(trainer.cfg, backend="gloo") if dist.is_initialized() else None
        self.pending: Future | None = None
        self.last_failed = False  # whether the newest save settled (on every rank) failed
        self.awaited = threading.Event()  # set once the training thread waits on the pending write
        self.writer: ThreadPoolExecutor | None = None
        self.stager: PieceStager | None = None
        self.needed = _global_bytes(trainer.state_tensors(True)) if trainer.cfg.checkpoint.save else 0
        if self.is_async:
            # on the trainer's GPU: a new thread's current device is GPU 0, where DCP's writer would make a context
            set_device = torch.cuda.set_device if trainer.device.type == "cuda" else None
            self.writer = ThreadPoolExecutor(1, "checkpoint-writer", initializer=set_device, initargs=(trainer.device,))
            # one stager for the whole run, its CPU buffers allocated now: saves only copy into them
            self.stager = PieceStager(pin_memory=trainer.device.type == "cuda")
            self.stager.reserve(trainer.state_tensors(True))

    def save(self) -> None:
        trainer, mesh, ckpt = self.trainer, self.trainer.mesh, self.trainer.cfg.checkpoint
        self.wait()
        self.awaited.clear()
        step = trainer.step
        tmp = store.temp_dir(self.root, step)
        unready = [(rank, cause) for rank, cause in enumerate(self._gather(self._prepare(step))) if cause]
        if unready:  # every rank knows, so none enters the write's collectives
            rank, cause = unready[0]
            self.last_failed = True
            self._stop_if_required(self._failed(step, tmp, f"{cause}, on rank {rank}") if mesh.rank == 0 else None)
            return
        start = time.perf_counter()
        pieces = trainer.state_tensors(True)
        rng = rng_states(trainer.device, mesh.rank)
        meta, config_yaml = _meta(trainer), trainer.resolved_config_yaml()

        def write(pieces: list[GlobalPiece]) -> str | None:
            """Write and commit; None, or (rank 0) the one-line reason nothing was committed."""
            try:
                if fault_hook("slowsave", step, mesh.rank) and self.is_async:  # (tests) in flight while training
                    self.awaited.wait(HELD_SAVE_CAP_S)
                if fault_hook("stallsave", step, mesh.rank):
                    threading.Event().wait()
                store.write_shards(tmp, rng, pieces, self.group)
                fault_hook("save", step, mesh.rank)
                if mesh.rank == 0:
                    final = store.commit(self.root, step, meta, config_yaml, ckpt.keep, ckpt.keep_every)
                    how = "async, " if self.is_async else ""
                    print_line(f"saved checkpoint {final} ({how}written in {time.perf_counter() - start:.2f} s)")
            except (OSError, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                return self._failed(step, tmp, _root_cause(e)) if mesh.rank == 0 else "failed"
            return None

        if not self.is_async:
            self._settle(write(pieces))
            return
        staged = self.stager.stage(pieces)
        self.pending = self.writer.submit(write, staged)
        blocked = time.perf_counter() - start
        if mesh.rank == 0:
            print_line(f"checkpoint step {step}: training blocked {blocked:.3f} s while staging; writing in background")

    def wait(self) -> None:
        """Block until the background save (if any) has finished and been committed, or has failed."""
        if self.pending is None:
            return
        done, self.pending = self.pending, None
        self.awaited.set()
        self._settle(done.result())

    def abandon(self) -> None:
        """(A rank leaving on an error.) Let a background save run on without agreeing on it: the other ranks may
        be blocked in a step this rank will not finish, and would never join the vote; the job ends on this
        rank's error, and the last committed checkpoint stays `latest`."""
        self.pending = None
        self.awaited.set()
        if self.writer is not None:
            self.writer.shutdown(wait=False, cancel_futures=True)

    def _prepare(self, step: int) -> str | None:
        """(Every rank.) Get ready to write step `step` (rank 0 makes its temporary directory); why not, or None."""
        try:
            fault_hook("disk", step, self.trainer.mesh.rank)
            if self.trainer.mesh.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self._warn_if_short_of_space(step)
                store.prepare(self.root, step)
        except OSError as e:
            return _root_cause(e)
        return None

    def _gather(self, cause: str | None) -> list[str | None]:
        """(Every rank.) Every rank's `cause`, in rank order; also the barrier before a write."""
        if self.group is None:
            return [cause]
        causes: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(causes, cause, group=self.group)
        return causes

    def _settle(self, failure: str | None) -> None:
        """(Every rank, in the training thread.) Agree whether a save failed; stop if checkpoints are required."""
        failed = torch.tensor([float(failure is not None)])  # on the host: the group is gloo
        if self.group is not None:
            dist.all_reduce(failed, group=self.group)  # also the barrier after a save
        self.last_failed = bool(failed.item())
        if self.last_failed:
            self._stop_if_required(failure)

    def _stop_if_required(self, failure: str | None) -> None:
        """(Every rank, once all know a save failed; rank 0 holds the line.) Stop with `checkpoint.required`."""
        if self.trainer.cfg.checkpoint.required:
            raise UserError(f"{failure or 'a checkpoint save failed on another rank'}; stopping: checkpoint.required")

    def _failed(self, step: int, tmp: Path, cause: str) -> str:
        """(Rank 0.) Remove the partial checkpoint and report the failure once."""
        shutil.rmtree(tmp, ignore_errors=True)
        free = _free_bytes(self.root)
        if free < self.needed:  # torch.save reports a full disk as "unexpected pos"
            cause = "No space left on device"
        kept = store.latest_complete(self.root)
        line = (
            f"checkpoint of step {step} could not be written to {self.root} ({cause}: it needs about "
            f"{_gb(self.needed)}, {_gb(free)} free); "
            + (f"{kept.name} stays the latest" if kept else "there is no earlier checkpoint")
        )
        print_line(f"megatronlite: {line}")
        return line

    def _warn_if_short_of_space(self, step: int) -> None:
        free = _free_bytes(self.root)
        if free < self.needed:
            print_line(
                f"megatronlite: warning: checkpoint of step {step} needs about {_gb(self.needed)} and {self.root} has "
                f"{_gb(free)} free: it will likely fail (lower checkpoint.keep, or free space)"
            )


def _global_bytes(pieces: list[GlobalPiece]) -> int:
    """(Every rank.) The bytes of one checkpoint: every global tensor once, whichever ranks hold it."""
    sizes = {p.key: math.prod(p.global_shape) * p.local.element_size() for p in pieces}
    if dist.is_initialized():
        every: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, sizes)
        for other in every:
            sizes.update(other)
    return sum(sizes.values())


def _root_cause(error: BaseException) -> str:
    """DCP wraps each rank's exception; the first one, in one line."""
    if isinstance(error, CheckpointException) and error.failures:
        first = next(iter(error.failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _free_bytes(path: Path) -> int:
    """Free bytes where `path` is, or would be made (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


HELD_SAVE_CAP_S = 120.0  # a held save that nothing waits on still ends


_FIRED: set[int] = set()  # the faults of MEGATRONLITE_FAULT (their places in it) that fire once, once fired


def new_run_of_faults() -> None:
    """(A trainer starting.) Faults that fire once fire again in a new run of this process (tests train often)."""
    _FIRED.clear()


def fault_hook(where: str, step: int, rank: int) -> bool:
    """Fault injection for tests: MEGATRONLITE_FAULT=WHERE:STEP[@RANK][,WHERE:STEP...].

    `save:N` SIGKILLs the process in the middle of saving step N (shards written, nothing committed);
    `disk:N` fails that save as a full disk would (ENOSPC);
    `slowsave:N` returns True: an async writer then holds step N's save after staging, before writing,
    until training waits on it (the next save, or the run's end), so it is in flight while the next steps train;
    `stallsave:N` returns True: the writer then never writes step N (a hung file system);
    `kill:N` SIGKILLs it as step N starts, on the first attempt only (an automatic restart goes on);
    `step:N` raises in step N; `nan:N` and `spike:N` return True, for the trainer to make step N's
    gradients NaN or its loss 100x; a `spike` once (a bad batch, which a rewind skips): list it again to make
    the redone step spike again. Without @RANK every rank is hit.
    """
    for index, fault in enumerate(filter(None, os.environ.get("MEGATRONLITE_FAULT", "").split(","))):
        target, _, only_rank = fault.partition("@")
        if target != f"{where}:{step}" or (only_rank and int(only_rank) != rank) or index in _FIRED:
            continue
        if where == "spike":
            _FIRED.add(index)
        if where == "save" or (where == "kill" and restart_count() == 0):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if where == "step":
            raise RuntimeError(f"injected fault at {where} {step} on rank {rank}")
        if where == "disk":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return where in ("nan", "spike", "slowsave", "stallsave")
    return False


def resolve_load(cfg: Config, run_dir: Path) -> Path | None:
    """The step directory a run in `run_dir` resumes from, per `checkpoint.load`: auto, null, or a path.

    A path (as torchtitan's initial_load_path) or null (fresh weights) is how a run starts: once the run
    directory holds a complete checkpoint of its own, every start resumes from that instead, so a restart, a
    requeue or the same command run again goes on from where the run got to, never back to the start."""
    load = cfg.checkpoint.load
    own = store.latest_complete(run_dir / "checkpoints")
    if own is not None or load in (None, "auto"):
        return own
    return store.find_step_dir(load)  # the config checked that the path exists


def maybe_resume(trainer) -> None:
    step_dir = resolve_load(trainer.cfg, trainer.run_dir)
    if step_dir is not None:
        load(trainer, step_dir)


def model_changes(saved: dict, now: dict, prefix: str = "model.") -> list[str]:
    """The model settings of a checkpoint's meta.json (`saved`) that differ from the config's (`now`), as
    `model.KEY SAVED, here NOW`."""
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += model_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key} {old}, here {new}")
    return out


def verify(cfg: Config, step_dir: Path, meta: dict, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Refuse a checkpoint whose tensors do not fit `cfg`'s model: one it lacks or shapes differently (of
    `expected`, the global shapes a rank loads), or one the model has no place for. A model config that differs
    in settings no tensor shows (rope_theta, the router's scores) is the user's to change: a warning line, returned."""
    changed = "; ".join(model_changes(meta.get("model") or {}, cfg.to_dict()["model"]))
    hint = f" (the checkpoint's model config differs: {changed})" if changed else ""
    store.check_shapes(step_dir, expected, weights.expected_keys(cfg, bool(meta.get("weights_only"))), hint)
    if not changed:
        return None
    return f"warning: checkpoint {step_dir} was saved with another model config: {changed}; training goes on with this"


def _verify_for(trainer, step_dir: Path, meta: dict, pieces: list[GlobalPiece]) -> None:
    """`verify` against the pieces this rank will read into; rank 0 prints its warning."""
    warning = verify(trainer.cfg, step_dir, meta, {p.key: p.global_shape for p in pieces})
    if warning and trainer.mesh.rank == 0:
        print_line(warning)


def load(trainer, step_dir: Path) -> None:
    """Put the trainer in the state a checkpoint holds (weights only, for a converted model)."""
    meta = store.read_meta(step_dir)
    if meta.get("weights_only"):
        _load_weights_only(trainer, step_dir, meta)
        return
    parts = trainer.stateful_parts()
    pieces = all_pieces(parts, False)
    mesh = trainer.mesh
    _verify_for(trainer, step_dir, meta, pieces)
    same_layout = meta.get("layout") == layout_of(trainer)
    rng = rng_states(trainer.device, mesh.rank)
    store.read_shards(step_dir, rng if same_layout else {}, pieces)
    if same_layout:
        torch.set_rng_state(rng[f"rng.cpu.rank{mesh.rank}"])
        if trainer.device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"rng.cuda.rank{mesh.rank}"], trainer.device)
    else:  # re-derived deterministically from the seed and step
        torch.manual_seed(trainer.cfg.train.seed + meta["step"])
    for part in parts.values():
        part.restore(meta)
    if mesh.rank == 0:
        print_line(f"resumed from {step_dir} at step {meta['step']}")


def _load_weights_only(trainer, step_dir: Path, meta: dict) -> None:
    """A converted or exported model: its weights, then training from step 0 with a fresh optimizer."""
    model = trainer.stateful_parts()["model"]
    pieces = model.pieces(False)
    _verify_for(trainer, step_dir, meta, pieces)
    store.read_shards(step_dir, {}, pieces)
    model.restore({})
    if trainer.mesh.rank == 0:
        print_line(f"initialized weights from {step_dir} (weights only: optimizer and data start fresh)")
