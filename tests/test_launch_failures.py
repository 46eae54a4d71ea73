"""A dying worker stops the whole job promptly, and the failing rank and its error are named."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
from helpers import error_of, launch_cmd, tiny_overrides

from megatronlite.checkpoint import store


@pytest.mark.slow
@pytest.mark.parametrize("saves", [{}, {"checkpoint.interval": 2, "checkpoint.async": "true"}])
def test_worker_failure_names_rank_and_stops_job(tmp_path, corpus, saves):
    """Also with an async save of step 2 still pending: the failing rank does not wait for the others to agree on
    it (they are blocked in step 3's collectives)."""
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"parallel.tensor": 2, "parallel.timeout_minutes": 5, **saves})
    cmd = launch_cmd(run, 2, sets)
    # the deadline is far below the 5-minute collective timeout: nobody waits for it
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "MEGATRONLITE_FAULT": "step:3@1"}
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "rank 1 failed" in last and "injected fault at step 3 on rank 1" in last, last


def test_launch_rejects_bad_layout_before_spawning(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatronlite",
            "launch",
            "configs/demo.yaml",
            "--nproc-per-node",
            "3",
            "--set",
            "parallel.tensor=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "megatronlite: error: world size 3 is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
        "(2 x 1 x 1); "
        "use a world size that is a multiple of 2"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--node-rank", "3"], "--node-rank 3: valid node ranks are 0 to 1 (--nnodes)"),
        (["--master-port", "99999"], "--master-port 99999: a TCP port, 1 to 65535"),
        (["--master-port", "65535", "--max-restarts", "2"], "1 to 65533 (with --max-restarts 2)"),
    ],
)
def test_launch_refuses_a_node_rank_or_port_torchrun_would_hang_or_fail_on(capsys, args, message):
    error = error_of(capsys, "launch", "configs/demo.yaml", "--nproc-per-node", "1", "--nnodes", "2", *args)
    assert error.startswith("megatronlite: error: ") and message in error, error


def test_the_first_worker_to_fail_is_named_when_both_failed_within_one_second(tmp_path):
    """torchrun's failure times have whole seconds: a peer that lost its connection to the failed worker a moment
    later ties with it, and the lower rank would be named. The error files' write times tell them apart."""
    from types import SimpleNamespace

    from megatronlite.launcher.torchrun import _telling_failure

    failures = {}
    for rank, written_ns in ((1, 1_000_100_000_000), (0, 1_000_200_000_000)):  # rank 1 first, in the same second
        error_file = tmp_path / f"error_{rank}.json"
        error_file.write_text("{}")
        os.utime(error_file, ns=(written_ns, written_ns))
        failures[rank] = SimpleNamespace(exitcode=1, timestamp=1000, error_file=str(error_file))
    assert _telling_failure(SimpleNamespace(failures=failures))[0] == 1


@pytest.mark.slow
def test_a_final_save_that_never_ends_is_caught_by_the_watchdog(tmp_path, corpus):
    """The last step's async save hangs on rank 1 (a hung file system): the job ends within the timeout, naming
    the phase, instead of waiting on the write for ever."""
    run = tmp_path / "run"
    sets = {"parallel.tensor": 2, "parallel.timeout_minutes": 0.25, "checkpoint.async": "true", "train.steps": 4}
    sets["checkpoint.interval"] = 2
    cmd = launch_cmd(run, 2, tiny_overrides(corpus, run, **sets))
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "MEGATRONLITE_FAULT": "stallsave:4@1"}
    )
    assert done.returncode != 0
    assert "no progress for" in done.stderr and "final checkpoint save" in done.stderr, done.stderr[-2000:]
    assert store.latest_complete(run / "checkpoints").name == "step_0000002"


def _wait_for_line(lines: queue.Queue, text: str, timeout: float) -> None:
    """Until a line with `text` came (`lines`: a process's output, None at its end); fail after `timeout` s."""
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, f"the output ended before a line with {text!r}"
        if text in line:
            return


@pytest.mark.slow
def test_sigusr1_to_the_launcher_saves_and_stops_the_workers(tmp_path, corpus):
    """`scancel --signal=USR1 JOB` reaches the launcher of a step too: torchrun handles no USR1, which killed it (and
    so the workers, unsaved). It is a save-and-stop request passed on to the workers; the launcher exits 3 with them."""
    run = tmp_path / "run"
    cmd = launch_cmd(run, 2, tiny_overrides(corpus, run, **{"train.steps": 100_000, "checkpoint.interval": 0}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait_for_line(lines, "step 1/100000", timeout=120)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    text = "".join(output)
    assert proc.returncode == 3, text[-3000:]
    assert "megatronlite: SIGUSR1: asking the workers to save and stop" in text
    assert "the workers stopped on request; the latest checkpoint is step" in text.strip().splitlines()[-1]
    assert store.latest_complete(run / "checkpoints") is not None
    assert not (run / ".save_and_exit").exists()  # the request was answered: a resumed run goes on


@pytest.mark.parametrize("restart", [0, 1])
def test_a_master_port_in_use_is_one_line(tmp_path, corpus, restart):
    """A port in use was torchrun's 40-line traceback (exit 1), also at the port + k of restart k."""
    run = tmp_path / "run"
    cmd = launch_cmd(run, 1, tiny_overrides(corpus, run), "--max-restarts", "1")
    port = int(cmd[cmd.index("--master-port") + 1])
    env = {**os.environ, "MEGATRONLITE_FAULT": "step:2"} if restart else None  # attempt 0 fails: restart 1 is tried
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + restart))
        busy.listen()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "DistNetworkError" not in done.stderr, done.stderr[-3000:]
    which = " (restart 1 meets at --master-port + 1)" if restart else ""
    assert done.stderr.strip().splitlines()[-1] == (
        f"megatronlite: error: --master-port {port}: the workers cannot meet at 127.0.0.1:{port + restart}{which}: "
        "the port is in use; choose a free port"
    )
