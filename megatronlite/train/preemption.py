"""Save-and-stop on request: how a preempted or time-limited job keeps its progress.

A request is SIGUSR1 to any worker (Slurm's `--signal=USR1@N` with srun-launched workers) or
the file `RUN_DIR/.save_and_exit` (what the sbatch template's trap writes, visible to every
node on a shared filesystem). Ranks agree through a one-element all-reduce after each step, so
they all save the same step and stop together; the job then requeues and resumes from it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `launch` imports EXIT_CODE and must start fast
    import torch

EXIT_CODE = 3  # the trainer saved and stopped on request
FLAG_FILE = ".save_and_exit"


class PreemptionWatch:
    def __init__(self, run_dir: Path, device: torch.device) -> None:
        self.flag_path = run_dir / FLAG_FILE
        self.device = device
        self.signalled = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """True on every rank once any rank saw a request."""
        import torch
        import torch.distributed as dist

        local = self.signalled or self.flag_path.exists()
        if not dist.is_initialized():
            return local
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def clear(self) -> None:
        self.flag_path.unlink(missing_ok=True)


class Preempted(Exception):
    """Raised after the checkpoint is saved; the CLI exits with EXIT_CODE."""
