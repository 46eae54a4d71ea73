"""`megatronlite launch`: validate the config for the whole job, then start its workers with torchrun.

Checking the config and the TP x PP x DP layout here means a bad value is reported once, before
any worker starts. When a worker dies, torchrun stops the others; we report which rank failed
and its error in one line instead of torchrun's report. SIGUSR1 to the launcher is a save-and-stop
request for the workers, as it is to a worker (train/preemption.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from megatronlite import config
from megatronlite.errors import UserError
from megatronlite.train.preemption import EXIT_CODE as PREEMPTED
from megatronlite.train.preemption import FLAG_FILE

LAUNCHER_PID = "MEGATRONLITE_LAUNCHER_PID"
RESTART_COUNT = "MEGATRONLITE_RESTART_COUNT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--nproc-per-node", type=int, required=True, help="workers on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (c10d rendezvous when given, e.g. a Slurm job id)")
    p.add_argument("--max-restarts", type=int, default=0, help="restart failed workers from the last checkpoint")


def torchrun_args(args: argparse.Namespace, attempt: int = 0) -> list[str]:
    """torchrun's command line for one attempt. Each attempt meets at the next port: a fresh store (torch
    2.13's own restarts reuse the store and its stale gloo addresses: connections refused or a hang)."""
    port = args.master_port + attempt
    out = [f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}"]
    if args.rdzv_id is not None:
        out += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master_addr}:{port}",
            f"--rdzv-id={args.rdzv_id}",
        ]
    else:
        out += [
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={port}",
        ]
    out += ["-m", "megatronlite", "train", args.config]
    if args.run_dir:
        out += ["--run-dir", args.run_dir]
    for item in args.set:
        out += ["--set", item]
    return out


def die_with_launcher() -> None:
    """(A worker started by torchrun.) Exit within a second of the launcher's death, however it dies.

    torchrun starts workers in their own session, so a signal to the launcher's process group (what
    schedulers and users send) never reaches them, and a launcher killed with SIGKILL forwards
    nothing. A daemon thread watches the parent and ends the worker when it is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = int(os.environ.get(LAUNCHER_PID) or os.getppid())

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="megatronlite-launcher-watch", daemon=True).start()


def main(args: argparse.Namespace) -> None:
    """Check the config, then run the workers, again after a failure up to --max-restarts times."""
    if args.nproc_per_node < 1 or args.nnodes < 1 or args.max_restarts < 0:
        raise UserError("--nproc-per-node and --nnodes must be >= 1, --max-restarts >= 0")
    if not 0 <= args.node_rank < args.nnodes:  # torchrun would wait for ever for the nodes below it
        raise UserError(f"--node-rank {args.node_rank}: valid node ranks are 0 to {args.nnodes - 1} (--nnodes)")
    if not 1 <= args.master_port <= 65535 - args.max_restarts:  # each restart takes the next port
        raise UserError(
            f"--master-port {args.master_port}: a TCP port, 1 to {65535 - args.max_restarts} "
            f"(with --max-restarts {args.max_restarts})"
        )
    cfg = config.load(args.config, args.set)
    config.validate_layout(cfg, args.nproc_per_node * args.nnodes)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    run_dir = config.run_dir(cfg, args.run_dir)
    stop_requested = pass_on_save_requests(run_dir)
    for attempt in range(args.max_restarts + 1):
        os.environ[RESTART_COUNT] = str(attempt)  # the workers resume and log the restart (train/restarts.py)
        code = _run_attempt(args, attempt, run_dir)
        if code in (0, 2, PREEMPTED) or attempt == args.max_restarts or stop_requested.is_set():
            sys.exit(code)
        print(f"megatronlite: restarting the workers ({attempt + 1} of {args.max_restarts})", file=sys.stderr)


def pass_on_save_requests(run_dir: Path) -> threading.Event:
    """Make SIGUSR1 to the launcher a save-and-stop request to the workers; the event is set once one came.

    torchrun handles only TERM/INT/HUP/QUIT: USR1 (what `scancel --signal=USR1 JOB` sends every task of a step)
    would kill the launcher, and the workers with it, unsaved. The request goes on as the flag file the workers
    poll: unlike a signal it cannot kill a worker still starting up, and every node sees it. The launcher keeps
    waiting for the workers, which save, stop and exit 3 (so does the launcher, see `_run_attempt`)."""
    requested = threading.Event()

    def on_usr1(signum: int, frame: object) -> None:
        requested.set()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FLAG_FILE).touch()
            note = "SIGUSR1: asking the workers to save and stop"
        except OSError as e:  # the workers go on; a handler must not raise into torchrun's loop
            note = f"SIGUSR1: cannot ask the workers to save and stop ({e})"
        os.write(2, f"megatronlite: {note}\n".encode())  # not print: the signal may have come in the middle of one

    signal.signal(signal.SIGUSR1, on_usr1)
    return requested


def _rendezvous_failure(args: argparse.Namespace, attempt: int, error: Exception) -> str:
    """One line for workers that could not meet: torchrun's is a traceback ending in the store's error."""
    text = str(error.__cause__ or error).strip()
    in_use = "EADDRINUSE" in text
    reason = "the port is in use; choose a free port" if in_use else (text.splitlines() or [type(error).__name__])[0]
    port = args.master_port + attempt
    restart = f" (restart {attempt} meets at --master-port + {attempt})" if attempt else ""
    return f"--master-port {args.master_port}: the workers cannot meet at {args.master_addr}:{port}{restart}: {reason}"


def _failed_at(failure) -> int:
    """When a worker failed, in ns: its error file's write time (the time recorded inside it has whole seconds,
    so a worker that failed first and the peer that lost its connection a moment later would tie)."""
    try:
        return os.stat(failure.error_file).st_mtime_ns
    except OSError:  # no error file: killed, or exited without raising
        return failure.timestamp * 10**9


def _telling_failure(e) -> tuple:
    """(rank, failure) that says why the job ended: the first worker that exited by itself (with its error or
    the watchdog's clue) before any torchrun killed by a signal on the way out; else the first failure."""
    exited = sorted((_failed_at(f), rank) for rank, f in e.failures.items() if f.exitcode >= 0)
    if not exited:
        return e.get_first_failure()
    rank = exited[0][1]
    return rank, e.failures[rank]


def _stopped_on_request(run_dir: Path) -> str:
    """The launcher's line for workers that stopped on request, naming the checkpoint a resume starts from: rank 0's
    own line may be cut off, as torchrun stops the workers once any of them has exited."""
    from megatronlite.checkpoint import store

    latest = store.latest_complete(run_dir / "checkpoints")
    if latest is None:
        return f"megatronlite: the workers stopped on request; {run_dir / 'checkpoints'} holds no complete checkpoint"
    return (
        f"megatronlite: the workers stopped on request; the latest checkpoint is step "
        f"{store.read_meta(latest)['step']} ({latest}): "
        "resume with checkpoint.load: auto"
    )


def _run_attempt(args: argparse.Namespace, attempt: int, run_dir: Path) -> int:
    """Run the workers once; the exit code the launcher would end with, having printed why."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(torchrun_args(args, attempt)))
    except (DistNetworkError, RendezvousError) as e:  # (both in torch 2.11 and 2.13)
        raise UserError(_rendezvous_failure(args, attempt, e)) from None
    except SignalException as e:  # torchrun has already passed the signal on to the workers and reaped them
        name = signal.Signals(e.sigval).name
        print(f"megatronlite: stopped by {name}; the workers were stopped with it", file=sys.stderr)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        rank, failure = _telling_failure(e)
        if failure.exitcode == PREEMPTED:
            print(_stopped_on_request(run_dir), file=sys.stderr)
            return PREEMPTED
        reason = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        reason = (reason or "").strip().splitlines()[-1:] or [f"exit code {failure.exitcode}"]
        by_signal = f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
        print(
            f"megatronlite: error: rank {rank} failed with exit code {failure.exitcode}"
            f"{by_signal}: {reason[0]}; the other workers were stopped",
            file=sys.stderr,
        )
        return 2 if failure.exitcode == 2 else 1
    return 0
