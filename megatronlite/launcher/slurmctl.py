"""Slurm's command-line tools (sbatch, scontrol) as functions: submit a script, follow a job to its end.

Only the tools are used (no REST API, no accounting database), so this works on any cluster a
user can `sbatch` on. Slurm's own reason is passed on whenever it refuses something.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from megatronlite.errors import UserError

# states a job never leaves (a requeued job goes back to PENDING, so REQUEUED is not one of them)
FINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(
            f"{name} not found on PATH: submit from a machine with the Slurm client tools (a login node), "
            f"or use --dry-run to print the job script"
        )
    return path


def _slurm_reason(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return re.sub(r"^\w+: error: ", "", lines[-1]) if lines else "no reason given"


def sbatch(script: Path) -> str:
    """Submit `script`; return the job id. A rejection is a UserError with Slurm's reason."""
    done = subprocess.run([_tool("sbatch"), "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"Slurm rejected the job: {_slurm_reason(done.stderr)}")
    return done.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as dicts, one per job (an array job gives one per task or pending range)."""
    done = subprocess.run([_tool("scontrol"), "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"cannot follow job {job_id}: {_slurm_reason(done.stderr)}")
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


def describe(record: dict[str, str]) -> str:
    """One job's state in a few words, e.g. `12: RUNNING on node1` or `12_3: PENDING (BeginTime), restart 1`."""
    name = record.get("JobId", "?")
    if record.get("ArrayTaskId"):
        name = f"{record.get('ArrayJobId')}_{record['ArrayTaskId']}"
    state = record.get("JobState", "UNKNOWN")
    text = f"{name}: {state}"
    if state == "RUNNING":
        text += f" on {record.get('NodeList', '?')}"
    elif record.get("Reason", "None") != "None":
        text += f" ({record['Reason']})"
    if state in FINAL_STATES:
        text += f", exit code {record.get('ExitCode', '?')}"
    if record.get("Restarts", "0") != "0":
        text += f", restart {record['Restarts']}"
    return text


def wait(job_id: str, poll_s: float = 2.0) -> list[dict[str, str]]:
    """Follow a job (every task of an array) until each is in a final state; print each change."""
    last = None
    while True:
        records = job_records(job_id)
        now = "; ".join(describe(r) for r in records)
        if now != last:
            print(f"{time.strftime('%H:%M:%S')} job {now}", flush=True)
            last = now
        if records and all(r.get("JobState") in FINAL_STATES for r in records):
            return records
        time.sleep(poll_s)
