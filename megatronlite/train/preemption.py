"""Save-and-stop on request: how a preempted or time-limited job keeps its progress.

A request is SIGUSR1 to any worker (Slurm's `--signal=USR1@N` with srun-launched workers), SIGTERM (what
Slurm's preemption, time limit and scancel send, and torchrun passes on: a worker may get it twice, from
both; as Megatron-LM's exit signal handler; both follow it with SIGKILL after their grace time), or the file
`RUN_DIR/.save_and_exit` (what the sbatch template's trap writes, visible to every node on a shared
filesystem). The signals are heard from the worker's start (`listen`), so one during start-up is a request
too. A flag file older than the worker by STALE_FLAG_S is a leftover of an earlier run, not a request to
this one.

Ranks agree through a small all-reduce at a poll, so they all save the same step and stop together; the job
then requeues and resumes from it. Polling only every few steps keeps the file stat, the copy to the device
and the world-wide all-reduce (each a wait for the slowest rank and, on GPU, a host sync) off most steps.
The gap between polls adapts so a request waits about POLL_SECONDS at most whatever the step time: each poll
also agrees on the slowest rank's seconds per step since the last one, and all ranks derive the same next
gap (1 to POLL_STEPS steps) from it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `launch` imports EXIT_CODE and must start fast
    import torch

EXIT_CODE = 3  # the trainer saved and stopped on request
FLAG_FILE = ".save_and_exit"
POLL_STEPS = 10  # the most steps between two looks for a request (one call of `requested` per step)
POLL_SECONDS = 10.0  # ... and about the most seconds
STALE_FLAG_S = 60.0  # a flag file this much older than the worker is not a request to it (clocks of a shared FS)

_signalled = threading.Event()
_listening_since: float | None = None


def listen(sigterm: bool = True) -> None:
    """(The main thread, first thing in a worker: `train`.) Hear save-and-stop signals from now on: SIGUSR1 and
    SIGTERM. A trainer in someone else's process (the Python API) takes SIGUSR1 only: SIGTERM stays its host's."""
    global _listening_since
    if _listening_since is not None or threading.current_thread() is not threading.main_thread():
        return
    _listening_since = time.time()
    for signum in (signal.SIGUSR1, signal.SIGTERM) if sigterm else (signal.SIGUSR1,):
        signal.signal(signum, lambda signum, frame: _signalled.set())


class PreemptionWatch:
    def __init__(self, run_dir: Path, device: torch.device) -> None:
        self.flag_path = run_dir / FLAG_FILE
        self.device = device
        self.calls = 0  # every rank calls `requested` once per step, so all of them poll at the same calls
        self.next_poll = 1  # the call that polls next (agreed by every rank at the previous poll)
        self.last_poll: tuple[int, float] | None = None  # (call, time) of the previous poll
        listen(sigterm=False)  # (where `train` did not already)
        self._drop_stale_flag()

    def _drop_stale_flag(self) -> None:
        """A flag an earlier run left (a request after its last poll, or before a crash) would stop this one at
        its first poll; one written since this worker started is a request to it."""
        try:
            if self.flag_path.stat().st_mtime < (_listening_since or time.time()) - STALE_FLAG_S:
                self.clear()
        except FileNotFoundError:
            pass

    def requested(self) -> bool:
        """True on every rank at the first poll after any rank saw a request (see the module doc)."""
        import torch
        import torch.distributed as dist

        self.calls += 1
        if self.calls < self.next_poll:
            return False
        now = time.monotonic()
        step_seconds = 0.0 if self.last_poll is None else (now - self.last_poll[1]) / (self.calls - self.last_poll[0])
        self.last_poll = (self.calls, now)
        local = _signalled.is_set() or self.flag_path.exists()
        if dist.is_initialized():  # any rank's request, and the slowest rank's step time
            agreed = torch.tensor([float(local), step_seconds], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            local, step_seconds = bool(agreed[0].item()), agreed[1].item()
        self.next_poll = self.calls + poll_gap(step_seconds)
        return local

    def clear(self) -> None:
        """(Once a request is answered, or the run is done.) Forget it: the flag file and a signal."""
        self.flag_path.unlink(missing_ok=True)
        _signalled.clear()


def poll_gap(step_seconds: float) -> int:
    """Steps until the next poll: POLL_STEPS for fast steps, fewer (at least 1) so a poll comes every
    POLL_SECONDS or so when steps are slow."""
    if step_seconds <= 0:
        return 1
    return max(1, min(POLL_STEPS, int(POLL_SECONDS / step_seconds)))


class Preempted(Exception):
    """Raised after the checkpoint is saved; the CLI exits with EXIT_CODE."""
