"""Against a real Slurm (CI starts a one-node cluster with .ci/slurm_up.sh): submit --wait, preemption
with requeue and resume, the srun launcher, a rejected submission, and a sweep as a job array.

Without a reachable Slurm every test here is skipped, with the reason (pytest -rs shows it).
"""

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import read_metrics, set_args, tiny_overrides

from megatronlite.launcher import slurmctl

REPO = Path(__file__).resolve().parents[1]
CPU_JOB = ["--gpus-per-node", "0"]


def _slurm(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def slurm_up() -> None:
    """Skip (saying why) unless a Slurm controller answers and a node can take jobs."""
    try:
        states = _slurm("sinfo", "--noheader", "--Node", "--format=%t").split()
    except FileNotFoundError:
        pytest.skip("no Slurm: sinfo is not installed (CI starts one with .ci/slurm_up.sh as root)")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no Slurm: sinfo failed: {e.stderr.strip()} (is SLURM_CONF set? see .ci/slurm_up.sh)")
    if not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        pytest.skip(f"no Slurm node can take jobs (node states: {states or 'none'})")


@pytest.fixture
def slurm(slurm_up) -> Iterator[None]:
    """The test cluster, to this test alone: its one node has two CPUs, so a job of the test running beside this
    one (pytest-xdist: the README's Slurm blocks) would queue this one's past its deadlines."""
    lock = Path(os.environ.get("MEGATRONLITE_SLURM_DIR", tempfile.gettempdir())) / "tests.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def submit(config: str, run_dir: Path, overrides: list[str], *flags: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "megatronlite", "submit", config, "--run-dir", str(run_dir), *CPU_JOB, *flags]
    cmd += set_args(overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)


def job_id(stdout: str) -> str:
    return stdout.split("submitted job ", 1)[1].split(":", 1)[0]


@pytest.mark.slow
def test_submit_wait_trains_on_two_workers(slurm, tmp_path, corpus):
    run = tmp_path / "run"
    done = submit("configs/demo.yaml", run, tiny_overrides(corpus, run), "--nproc-per-node", "2", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED, exit code 0:0" in done.stdout and f"run directory: {run}" in done.stdout
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 9))
    assert (run / "checkpoints" / "latest").read_text() == "step_0000008"
    log = (run / f"slurm-{job_id(done.stdout)}.out").read_text()
    assert "on 2 worker(s) (tp=1 pp=1 cp=1 dp=2)" in log


@pytest.mark.slow
def test_wait_reports_a_failed_job_with_its_log(slurm, tmp_path, corpus):
    run = tmp_path / "run"
    env = {**os.environ, "MEGATRONLITE_FAULT": "step:3"}  # sbatch passes the environment on to the job
    done = submit("configs/demo.yaml", run, tiny_overrides(corpus, run), "--wait", env=env)
    assert done.returncode == 1
    assert f"job {job_id(done.stdout)}: FAILED (NonZeroExitCode), exit code 1:0" in done.stderr
    assert "injected fault at step 3 on rank 0" in done.stderr  # from the tail of the job's log


@pytest.mark.slow
def test_srun_launcher_runs_one_task_per_worker(slurm, tmp_path, corpus):
    run = tmp_path / "run"
    overrides = tiny_overrides(corpus, run, **{"train.steps": 4})
    done = submit("configs/demo.yaml", run, overrides, "--nproc-per-node", "2", "--launcher", "srun", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on 2 worker(s)" in (run / f"slurm-{job_id(done.stdout)}.out").read_text()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.3)


def _record(job: str) -> dict:
    return slurmctl.job_records(job)[0]


@pytest.mark.slow
def test_warning_signal_saves_requeues_and_resumes(slurm, tmp_path, corpus):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the trainer saves
    and stops, the job requeues itself and the second run continues from the saved step to the end."""
    run = tmp_path / "run"
    overrides = tiny_overrides(corpus, run, **{"train.steps": 300, "checkpoint.interval": 100, "logging.interval": 1})
    done = submit("configs/demo.yaml", run, overrides, "--nproc-per-node", "2", "--time", "10:00")
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, "training to start")
    _slurm("scancel", "--signal=USR1", "--batch", job)
    _wait_for(lambda: _record(job).get("Restarts") == "1", "the job to requeue itself")
    # Slurm holds a requeued job back for its credential lifetime (cred_expire + 1 s; .ci/slurm_up.sh sets 20 s):
    # starting it earlier (scontrol update StartTime=now) races slurmd's revocation of the first run's credential
    # ("Job credential revoked", the step fails at once)
    final = slurmctl.wait(job, poll_s=1.0)[0]
    log = (run / f"slurm-{job}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log)
    saved = int(log.split("the latest checkpoint is step ", 1)[1].split()[0])  # the launcher's line
    assert 0 < saved < 300, log
    assert f"resumed from {run / 'checkpoints' / f'step_{saved:07d}'} at step {saved}" in log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 301)), "metrics continue from the saved step with no gap or repeat"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000300"
    assert not (run / ".save_and_exit").exists()


def test_rejected_submission_shows_slurm_reason(slurm, tmp_path, corpus):
    run = tmp_path / "run"
    done = submit("configs/demo.yaml", run, tiny_overrides(corpus, run), "--partition", "no-such-partition")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "megatronlite: error: Slurm rejected the job: Batch job submission failed: Invalid partition name specified"
    ]


@pytest.mark.slow
def test_sweep_as_job_array(slurm, tmp_path, corpus):
    base = tmp_path / "base.yaml"
    base.write_text((REPO / "configs" / "demo.yaml").read_text())
    overrides = tiny_overrides(corpus, tmp_path / "x", **{"train.steps": 4, "checkpoint.interval": 0})
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        json.dumps({"name": "arr", "base": "base.yaml", "overrides": overrides, "grid": {"optim.lr": [1e-3, 3e-3]}})
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "megatronlite", "sweep", str(sweep), "--executor", "slurm", "--out", str(out)]
    done = subprocess.run(
        [*cmd, *CPU_JOB, "--max-parallel", "2", "--wait"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted job array" in done.stdout
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:]), rows
    assert len(list((out / "logs").glob("slurm-*_*.out"))) == 2
