"""Faults end a run with a clue, never a hang or a silent wrong answer: a stalled worker, a killed launcher,
a crashed worker with restarts, NaN and spiking losses."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import error_of, launch, launch_cmd, read_metrics, set_args, tiny_overrides, train, train_job

from megatronlite.checkpoint import store
from megatronlite.checkpoint.weights import read_tensors
from megatronlite.cli import main


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_training(proc: subprocess.Popen, run: Path, workers: int, timeout: float = 120) -> list[int]:
    """Block until the run has logged a step (its workers are in the training loop); their pids.

    Waits on the metrics file the logging rank writes after its first step, by polling with a deadline."""
    import time

    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists() and metrics.read_text().strip():
            pids = children(proc.pid)
            if len(pids) == workers:
                return pids
        time.sleep(0.2)
    raise TimeoutError("the run logged no step")


def wait_gone(pids: list[int], timeout: float = 60) -> list[int]:
    """Poll (with a deadline) until none of `pids` runs; the ones still running at the deadline."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


LONG = {"train.steps": 100000, "checkpoint.interval": 0, "checkpoint.save": "false", "logging.interval": 1}


@pytest.mark.slow
def test_a_stalled_worker_ends_the_job_with_its_stacks(tmp_path, corpus):
    """SIGSTOP one of two TP workers: the other's watchdog writes its stacks within twice the timeout, names the
    stopped rank and ends the job."""
    import time

    run = tmp_path / "run"
    timeout_s = 15
    sets = tiny_overrides(corpus, run, **LONG, **{"parallel.tensor": 2, "parallel.timeout_minutes": timeout_s / 60})
    proc = subprocess.Popen(launch_cmd(run, 2, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_training(proc, run, 2)
        stopped = max(workers)
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.time()
        _, err = proc.communicate(timeout=120)  # the job's shutdown after the clue is torchrun's, slower under load
    finally:
        proc.kill()
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert "no progress for" in last and "not responding" in last and f"pid {stopped}" in last, last
    stacks = list((run / "hang").glob("rank_*.txt"))
    assert len(stacks) == 1, stacks  # the healthy rank's; the stopped one could not write
    assert stacks[0].stat().st_mtime - stopped_at < 2 * timeout_s
    text = stacks[0].read_text()
    # the healthy rank waits in whichever collective the stopped one missed (a step's or the loop's own), named
    assert re.search(r"waiting in step \d+ \([a-z -]+, in [a-z_]+\)", text) and "Thread" in text, text
    assert not wait_gone([stopped], timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_launchers_process_group_leaves_no_worker(tmp_path, corpus, sig):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **LONG)
    proc = subprocess.Popen(
        launch_cmd(run, 2, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        workers = wait_for_training(proc, run, 2)
        os.killpg(proc.pid, getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        for p in children(proc.pid):
            os.kill(p, signal.SIGKILL)
    assert not wait_gone(workers), "workers outlived their launcher"
    if sig == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM
        assert err.strip().splitlines()[-1] == "megatronlite: stopped by SIGTERM; the workers were stopped with it"


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_continues_exactly(tmp_path, corpus):
    sets = {"train.steps": 8, "checkpoint.interval": 3, "parallel.tensor": 2, "parallel.timeout_minutes": 1}
    ref = tmp_path / "ref"
    done = train_job("configs/demo.yaml", ref, 2, tiny_overrides(corpus, ref, **sets))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    env = {**os.environ, "MEGATRONLITE_FAULT": "kill:5@1"}
    cmd = launch_cmd(run, 2, tiny_overrides(corpus, run, **sets), "--max-restarts", "1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = read_metrics(run), read_metrics(ref)
    assert [m["step"] for m in got] == list(range(1, 9))  # the steps after the checkpoint appear once
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # bit for bit
    restarts = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert [(r["restart"], r["resumed_at_step"]) for r in restarts] == [(1, 3)]


@pytest.mark.slow
def test_a_save_and_exit_request_saves_stops_and_resumes_exactly(tmp_path, corpus):
    """Preemption without Slurm: the flag file the sbatch trap writes, dropped once the run trains. The workers
    save the step they reached and exit 3; `checkpoint.load: auto` then finishes with the uninterrupted losses."""
    steps = 200  # many times more than the steps run while the test notices the first one and writes the flag
    sets = {"train.steps": steps, "checkpoint.interval": 0, "logging.interval": 1}
    ref = tmp_path / "ref"
    done = train_job("configs/demo.yaml", ref, 2, tiny_overrides(corpus, ref, **sets))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    overrides = tiny_overrides(corpus, run, **sets)
    proc = subprocess.Popen(launch_cmd(run, 2, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(proc, run, 2)
        (run / ".save_and_exit").touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < steps, "the run ended before it saw the request"
    saved = run / "checkpoints" / f"step_{stopped:07d}"
    want_line = f"the latest checkpoint is step {stopped} ({saved}): resume with checkpoint.load: auto"
    assert err.strip().splitlines()[-1] == f"megatronlite: the workers stopped on request; {want_line}"
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:07d}"
    assert not (run / ".save_and_exit").exists()

    done = launch("configs/demo.yaml", run, 2, overrides)  # demo.yaml has checkpoint.load: auto
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped}" in done.stdout
    got, want = read_metrics(run), read_metrics(ref)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # bit for bit


def test_sigterm_to_a_worker_saves_and_stops(tmp_path, corpus):
    """What Slurm's preemption, time limit and scancel send (and torchrun passes on): the worker saves the step it
    reached and exits 3, as on SIGUSR1, instead of dying with everything since the last interval checkpoint."""
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.steps": 5000, "checkpoint.interval": 0})
    cmd = [sys.executable, "-m", "megatronlite", "train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(proc, run, 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < 5000 and (run / "checkpoints" / "latest").read_text() == f"step_{stopped:07d}", err[-3000:]
    assert f"saved step {stopped} and stopped on request" in err, err[-3000:]


def test_a_flag_an_earlier_run_left_is_not_a_request(tmp_path, corpus):
    """A flag file older than the worker (a request after an earlier run's last look) does not stop this run after
    one step; a finished run leaves none behind."""
    run = tmp_path / "run"
    run.mkdir()
    flag = run / ".save_and_exit"
    flag.touch()
    os.utime(flag, (time.time() - 3600, time.time() - 3600))
    assert [m["step"] for m in train(run, tiny_overrides(corpus, run))] == list(range(1, 9))
    assert not flag.exists()


# --- NaN, inf and spikes ---------------------------------------------------------------------


def _weights_finite(run: Path) -> bool:
    for step_dir in sorted((run / "checkpoints").glob("step_*")):
        names = [k.removeprefix("model.") for k in store.stored_shapes(step_dir) if k.startswith("model.")]
        if not all(torch.isfinite(t).all() for _, t in read_tensors(step_dir, names)):
            return False
    return True


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_diverging_run_stops_without_a_nan_checkpoint(tmp_path, corpus, capsys, precision):
    run = tmp_path / "run"
    sets = tiny_overrides(
        corpus,
        run,
        **{
            "optim.lr": 1000.0,
            "optim.warmup_steps": 0,
            "train.precision": precision,
            "train.steps": 60,
            "checkpoint.interval": 1,
            "train.max_skipped_steps": 3,
        },
    )
    line = error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets))
    if precision == "fp16":  # the scaler halves to its minimum first, then stops on overflows there
        assert "fp16 overflow at the minimum loss scale" in line, line
    else:
        assert "non-finite" in line and "on rank(s) 0" in line and "no checkpoint holds this state" in line, line
    assert _weights_finite(run)


def test_skip_mode_drops_the_bad_step_and_counts_it(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("MEGATRONLITE_FAULT", "nan:3")
    run = tmp_path / "run"
    metrics = train(run, tiny_overrides(corpus, run, **{"train.on_nonfinite": "skip"}))
    assert [m["nonfinite_skipped"] for m in metrics] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert metrics[2]["grad_norm"] is None and all(math.isfinite(m["loss"]) for m in metrics)
    assert _weights_finite(run)
    # the skipped step did not move the weights: a run of 2 steps, then the same batches from step 4 on,
    # differs from this one only in step 3's update, so the losses after it differ from an unskipped run's
    monkeypatch.delenv("MEGATRONLITE_FAULT")
    clean = train(tmp_path / "clean", tiny_overrides(corpus, tmp_path / "clean"))
    assert [m["loss"] for m in metrics[:3]] == [m["loss"] for m in clean[:3]]
    assert metrics[3]["loss"] != clean[3]["loss"]


def test_injected_nan_stops_by_default(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRONLITE_FAULT", "nan:3")
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"checkpoint.interval": 1})
    line = error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets))
    assert line.startswith("megatronlite: error: step 3: non-finite gradients (gradients on rank(s) 0)"), line
    assert store.latest_complete(run / "checkpoints").name == "step_0000002"


def test_a_loss_spike_stops_or_rewinds(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRONLITE_FAULT", "spike:7")
    spike = {"train.loss_spike_factor": 3.0, "train.steps": 10}
    run = tmp_path / "stop"
    sets = tiny_overrides(corpus, run, **spike)
    line = error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets))
    assert "step 7: loss spike" in line and "train.on_loss_spike: stop" in line, line

    run = tmp_path / "rewind"
    metrics = train(run, tiny_overrides(corpus, run, **spike, **{"train.on_loss_spike": "rewind"}))
    out = capsys.readouterr().out
    assert "step 7: loss spike" in out and "rewound to step_0000004, skipping the next 12 samples" in out, out
    assert "from the start of the order again" not in out, out
    assert [m["step"] for m in metrics] == list(range(1, 11))  # the steps redone after the rewind appear once
    # after the rewind the data goes on past the spike's batch: step 5 reads what step 8 would have
    assert metrics[4]["consumed_samples"] == 8 * 4 and metrics[-1]["consumed_samples"] == 13 * 4

    run = tmp_path / "again"  # the redone step 7 spikes again, judged against the checkpoint's recent losses
    monkeypatch.setenv("MEGATRONLITE_FAULT", "spike:7,spike:7,spike:7")
    again = {"train.on_loss_spike": "rewind", "train.max_skipped_steps": 2}
    line = error_of(
        capsys,
        "train",
        "configs/demo.yaml",
        "--run-dir",
        str(run),
        *set_args(tiny_overrides(corpus, run, **spike, **again)),
    )
    assert "step 7: loss spike" in line and "3 rewinds without getting past step 7" in line, line

    run = tmp_path / "blend"  # a blend holds the planned 40 samples, no more: the rewound run's last 12 wrap
    blend = {"train.on_loss_spike": "rewind", "data.sources": f"[{{path: {corpus}}}, {{path: {corpus}}}]"}
    train(run, tiny_overrides(corpus, run, **spike, **blend))
    out = capsys.readouterr().out
    assert "the run now needs 52 samples, past the 40 its data holds" in out, out


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """`run/checkpoints` on a 2 MB tmpfs (one tiny checkpoint fits, two do not); None where mounting is not
    possible (the tests then inject ENOSPC instead)."""
    where = tmp_path / "run" / "checkpoints"
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        print(f"no tmpfs ({mounted.stderr.strip()}): injecting ENOSPC")
        yield None
        return
    yield where
    subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("is_async", ["false", "true"])
@pytest.mark.parametrize("required", ["false", "true"])
def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, corpus, capsys, monkeypatch, small_disk, is_async, required):
    if small_disk is None:
        monkeypatch.setenv("MEGATRONLITE_FAULT", "disk:8")
    run = tmp_path / "run"
    sets = tiny_overrides(
        corpus, run, **{"checkpoint.keep": 1, "checkpoint.async": is_async, "checkpoint.required": required}
    )
    argv = ["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)]
    if required == "true":
        line = error_of(capsys, *argv)
        assert "stopping: checkpoint.required" in line, line
    else:  # the last step's save: training has nothing left to go on to, and the job must not end as a success
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        out, err = capsys.readouterr()
        assert stopped.value.code == 2 and "trained to step 8, but its checkpoint could not be written" in err, err
        assert "step_0000004 is the latest" in err, err
        line = next(x for x in out.splitlines() if "could not be written" in x)
        if small_disk is not None:  # the free-space check saw it coming
            assert "checkpoint of step 8 needs about" in out and "it will likely fail" in out, out
    assert "checkpoint of step 8 could not be written" in line and "No space left on device" in line, line
    assert "step_0000004 stays the latest" in line and " free)" in line
    root = run / "checkpoints"
    assert store.latest_complete(root).name == "step_0000004"
    assert not list(root.glob(".tmp-*"))  # the partial save is gone


def test_a_save_one_rank_cannot_start_is_agreed_and_training_goes_on(tmp_path, corpus):
    """Rank 1 fails before writing (its disk full as it starts): both ranks skip that save at once, rank 0 names
    the rank in one line, the earlier checkpoint stays `latest` and training goes on to a later save."""
    env = {**os.environ, "MEGATRONLITE_FAULT": "disk:4@1"}
    run = tmp_path / "run"
    done = train_job("configs/demo.yaml", run, 2, tiny_overrides(corpus, run, **{"checkpoint.interval": 2}), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if "could not be written" in x)
    assert "checkpoint of step 4 could not be written" in line and "on rank 1" in line, line
    assert "step_0000002 stays the latest" in line, line
    assert store.latest_complete(run / "checkpoints").name == "step_0000008"


def test_a_stop_on_request_whose_save_failed_says_so(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRONLITE_FAULT", "disk:1")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".save_and_exit").touch()
    with pytest.raises(SystemExit) as stopped:
        main(["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(tiny_overrides(corpus, run))])
    err = capsys.readouterr().err
    assert stopped.value.code == 3, err
    assert "at step 1 (its checkpoint could not be written; a resume goes on from the start)" in err, err
    assert "saved step" not in err, err
