"""A run directory is never damaged by another run: a refused start keeps its config.yaml, a second trainer is
refused while the first holds the lock, and a resumed run's metrics.jsonl holds each step once."""

import json
import os
import select
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import error_of, launch, set_args, tiny_overrides

from megatronlite.config import Config, LoggingConfig
from megatronlite.errors import UserError
from megatronlite.train import run_log
from megatronlite.train.run_lock import LOCK_FILE, RunLock
from megatronlite.train.run_log import RunLog

HOLD_LOCK = (
    "import sys\n"
    "from megatronlite.train.run_lock import RunLock\n"
    "RunLock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (as job 4242) until the test ends."""
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _train_args(run, overrides):
    return ["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(overrides)]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, "/nonexistent/prefix"),  # found missing by the Trainer, after the layout checks
        ({"parallel.tensor": 2}, "world size 1 is not divisible"),
        ({"optim.lr": ".nan"}, "'optim.lr' must be a finite number"),
    ],
    ids=["missing-data", "bad-layout", "bad-value"],
)
def test_refused_run_keeps_the_existing_config(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: the-first-run\n")
    line = error_of(capsys, *_train_args(run, tiny_overrides("/nonexistent/prefix", run, **extra)))
    assert message in line
    assert (run / "config.yaml").read_text() == "name: the-first-run\n"
    lock_file = run / LOCK_FILE  # absent when the config was refused before the trainer started
    assert not lock_file.exists() or lock_file.read_text() == ""  # else released and emptied on the way out
    RunLock(run).release()


def test_second_trainer_is_refused_naming_the_holder(tmp_path, capsys, corpus, holder):
    run = tmp_path / "run"
    line = error_of(capsys, *_train_args(run, tiny_overrides(corpus, run)))
    assert line == (
        f"megatronlite: error: run directory {run} is in use by another trainer (host {socket.gethostname()}, "
        f"pid {holder.pid}, job 4242); wait for it to end, stop it, or give another --run-dir"
    )
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    RunLock(run).release()  # free again once the holder is gone


@pytest.mark.slow
def test_multi_process_job_is_refused_on_every_rank(tmp_path, corpus, holder):
    """Rank 0 is refused; rank 1 learns it from the all-reduce instead of hanging in the mesh's collectives."""
    run = tmp_path / "run"
    done = launch("configs/demo.yaml", run, 2, tiny_overrides(corpus, run, **{"parallel.timeout_minutes": 5}), 120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"pid {holder.pid}, job 4242" in last, last
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_lock_of_a_killed_run_is_taken_over(tmp_path, capsys, holder):
    run = tmp_path / "run"
    holder.kill()
    holder.wait(timeout=30)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead holder's name stays
    lock = RunLock(run)
    assert capsys.readouterr().err.splitlines() == [
        f"megatronlite: taking over the lock of host {socket.gethostname()}, pid {holder.pid}, job 4242 "
        "(no longer running)"
    ]
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match="in use by another trainer"):
        RunLock(run)  # a second open file in this very process is refused too
    lock.release()
    RunLock(run).release()  # a cleanly released lock names nobody: no takeover line
    assert capsys.readouterr().err == ""


def _records(steps, torn=False):
    lines = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
    return lines + ('{"step": 9, "lo' if torn else "")


def _run_log(run_dir, start_step, logging_rank=True):
    mesh = SimpleNamespace(is_logging_rank=logging_rank, world_size=1)
    cfg = Config(logging=LoggingConfig(interval=1))
    return RunLog(cfg, run_dir, mesh, torch.device("cpu"), start_step=start_step)


def test_resumed_run_log_drops_the_records_after_its_start(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_records(range(1, 9), torn=True))  # killed at step 9, mid-write; resumes from step 4
    log = _run_log(tmp_path, start_step=4)
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines())] == [1, 2, 3, 4]
    log.step_done(5, 0.5, 1.0, 40, None, {})
    log.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left


def test_run_log_without_a_start_step_or_off_the_logging_rank_keeps_every_record(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_records(range(1, 9)))
    _run_log(tmp_path, start_step=None).close()
    _run_log(tmp_path, start_step=2, logging_rank=False).close()
    assert metrics.read_text() == _records(range(1, 9))


def test_fresh_run_log_starts_a_metrics_file(tmp_path):
    _run_log(tmp_path, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_evaluation_and_saves_are_left_out_of_tokens_per_sec(tmp_path, monkeypatch):
    """An interval of two 1-second steps, one with a 4-second evaluation, one followed by a 3-second save: the
    record says 2 seconds of training, and the save stays out of the next interval too."""
    now = [0.0]
    monkeypatch.setattr(run_log, "clock", lambda: now[0])
    log = _run_log(tmp_path, start_step=0)
    log.cfg.logging.interval = 2
    now[0] += 1.0
    with log.paused():
        now[0] += 4.0
    log.step_done(1, 0.5, 1.0, 8, None, {})
    now[0] += 1.0
    log.step_done(2, 0.5, 1.0, 16, None, {})
    with log.paused():
        now[0] += 3.0
    now[0] += 1.0
    log.step_done(3, 0.5, 1.0, 24, None, {})
    now[0] += 1.0
    log.step_done(4, 0.5, 1.0, 32, None, {})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tokens = 2 * log.tokens_per_step
    assert [r["tokens_per_sec"] for r in records] == [tokens / 2.0, tokens / 2.0]
    assert [r["elapsed_s"] for r in records] == [6.0, 11.0]  # wall time, pauses included
