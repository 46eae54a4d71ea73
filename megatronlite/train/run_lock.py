"""One trainer per run directory: rank 0 holds an exclusive `flock` on RUN_DIR/.lock for the life of the run.

Two trainers on one run directory would interleave metrics.jsonl and race on checkpoints/latest. A flock
belongs to the open file, so the kernel drops it when the holder dies, however it dies: a lock file left by a
killed run never blocks the next one. The file names its holder (host, pid, job id) so that a refused run can
say who is in the way; a cleanly ended run empties it. Only rank 0 locks; the other ranks learn the outcome
from one all-reduce, so a refused job stops on every rank instead of hanging in its first collective.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatronlite.errors import UserError

LOCK_FILE = ".lock"


def this_holder() -> dict:
    """Who takes the lock: this host and process, and the launcher's job id when there is one."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job}


def describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, job {holder.get('job') or 'none'}"


def in_use(run_dir: Path, holder: dict | None) -> UserError:
    who = describe(holder) if holder else "a process that has not yet written its name"
    return UserError(
        f"run directory {run_dir} is in use by another trainer ({who}); wait for it to end, stop it, or give "
        "another --run-dir"
    )


def read_holder(path: Path) -> dict | None:
    """The holder a lock file names; None when it names none (empty after a clean end, missing, or garbage)."""
    try:
        holder = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """The exclusive lock on RUN_DIR/.lock (the directory is made if needed), held until `release()` or exit.

    Raises UserError naming the holder when another process holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run directory's lock file ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise in_use(self.path.parent, read_holder(self.path)) from None
        self._claim()

    def _claim(self) -> None:
        """Write our name over the previous holder's; a name still there means that run died holding the lock."""
        previous, me = read_holder(self.path), this_holder()
        if previous and (previous.get("host"), previous.get("pid")) != (me["host"], me["pid"]):
            print(f"megatronlite: taking over the lock of {describe(previous)} (no longer running)", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        """Empty the file, then unlock: the next run sees that this one ended cleanly."""
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def held_by(run_dir: Path) -> dict | None:
    """Who holds `run_dir`'s lock now ({} when the holder has not written its name, None when nobody holds it),
    found without taking it or writing anything."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {}
    finally:
        os.close(fd)  # closing drops the lock if it was ours for a moment
    return None


def lock_run_dir(run_dir: Path, rank: int, world_size: int, device: torch.device) -> RunLock | None:
    """Rank 0 takes the run directory's lock (returned; None on other ranks); if it cannot, every rank raises.

    Call it on every rank right after joining the job and before any other collective: the outcome travels
    as one all-reduced int on the world group (on `device`, which NCCL needs to be this rank's GPU)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
        except UserError as e:
            error = e
    if world_size > 1:
        refused = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(refused)
        if refused.item() and rank != 0:
            holder = read_holder(Path(run_dir) / LOCK_FILE)
            why = f"in use by {describe(holder)}" if holder else "see rank 0's error"
            error = UserError(f"run directory {run_dir}: rank 0 could not take its lock ({why})")
    if error is not None:
        raise error
    return lock
