"""Automatic restarts (`launch --max-restarts N`, the Slurm templates' `with_restarts`, a Slurm requeue): which
attempt this is, and a record of each in `RUN_DIR/restarts.jsonl`. A restarted worker resumes from the run's
last complete checkpoint, whatever `checkpoint.load` first named (checkpointing.resolve_load)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# torchrun's; launch's and with_restarts'; Slurm's, in a requeued job
COUNT_VARS = ("TORCHELASTIC_RESTART_COUNT", "MEGATRONLITE_RESTART_COUNT", "SLURM_RESTART_COUNT")
LOG = "restarts.jsonl"


def restart_count() -> int:
    """0 on the first attempt, N on the N-th restart."""
    return max(int(os.environ.get(var) or 0) for var in COUNT_VARS)


def record_restart(run_dir: Path, step: int) -> None:
    """(Rank 0.) Append this restart to the run directory's log."""
    rec = {"restart": restart_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step}
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
