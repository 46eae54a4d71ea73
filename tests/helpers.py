"""Shared test helpers: tiny-run overrides and metrics reading."""

import json
import shutil
from pathlib import Path


def conversion_model(arch: str, **changes):
    """A tiny model with every field explicit, as a conversion writes them; `changes` replace fields."""
    import dataclasses

    from megatronlite.config import ModelConfig

    base = {
        "llama": ModelConfig(
            arch="llama",
            num_layers=2,
            hidden_size=32,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden_size=48,
            vocab_size=77,
            max_seq_len=32,
            tie_embeddings=False,
        ),
        "gpt2": ModelConfig(
            arch="gpt2",
            num_layers=2,
            hidden_size=24,
            num_heads=3,
            num_kv_heads=3,
            ffn_hidden_size=96,
            vocab_size=77,
            max_seq_len=32,
            tie_embeddings=True,
        ),
    }[arch]
    return dataclasses.replace(base, **changes)


def tiny_overrides(corpus: str, run_dir: Path, arch: str = "llama", **extra) -> list[str]:
    """--set overrides for a tiny, fast run on `corpus`."""
    sets = {
        "model.arch": arch,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_heads": 4,
        "model.num_kv_heads": 4 if arch == "gpt2" else 2,
        "model.ffn_hidden_size": 128,
        "model.max_seq_len": 64,
        "train.seq_len": 64,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.steps": 8,
        "train.eval_interval": 0,
        "optim.lr": 3.0e-3,
        "optim.warmup_steps": 2,
        "logging.interval": 1,
        "checkpoint.interval": 4,
        "data.sources": f"[{{path: {corpus}}}]",
        "data.cache_dir": str(run_dir.parent / "cache"),
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def set_args(overrides) -> list[str]:
    """`--set KEY=VALUE` for each override: a command line's config overrides."""
    return [arg for o in overrides for arg in ("--set", o)]


def train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """`megatronlite train configs/demo.yaml` in this process; the run's metrics records."""
    from megatronlite.cli import main

    main(["train", "configs/demo.yaml", "--run-dir", str(run_dir), *set_args(overrides)])
    return read_metrics(run_dir)


def resume_from(source_run: Path, step_name: str, run_dir: Path) -> None:
    """Make `run_dir` a run whose latest checkpoint is `source_run`'s `step_name` (a copy)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / step_name, run_dir / "checkpoints" / step_name)
    (run_dir / "checkpoints" / "latest").write_text(step_name)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


_PORT_BLOCK = 1000  # per pytest-xdist worker, below the Slurm template's ports (20000 up)
_PORT_STRIDE = 8  # a launcher's restarts take the next ports up
_ports_given = 0


def free_port() -> int:
    """A free TCP port that stays free until a launcher binds it, seconds later.

    Not one the kernel picks (bind to port 0): that is from the ephemeral range, where the gloo connections of
    the test running beside this one (pytest-xdist) take ports all the time. Below that range only explicit
    binds take a port; each xdist worker walks its own block, a port coming round again only after a hundred
    others (a random start: two sessions on one machine rarely meet)."""
    import os
    import random
    import socket

    global _ports_given
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    first, slots = 10000 + (worker % 8) * _PORT_BLOCK, _PORT_BLOCK // _PORT_STRIDE
    if _ports_given == 0:
        _ports_given = random.randrange(slots)
    for _ in range(slots):
        port = first + (_ports_given % slots) * _PORT_STRIDE
        _ports_given += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {first}-{first + _PORT_BLOCK}")


def launch_cmd(run_dir: Path, nproc: int, overrides: list[str], *extra: str, config="configs/demo.yaml") -> list[str]:
    """The `megatronlite launch` command line (torchrun, gloo, a free port) of a run with `--set` overrides."""
    import sys

    cmd = [sys.executable, "-m", "megatronlite", "launch", str(config), "--nproc-per-node", str(nproc)]
    return [*cmd, "--master-port", str(free_port()), "--run-dir", str(run_dir), *extra, *set_args(overrides)]


def launch(config: Path, run_dir: Path, nproc: int, overrides: list[str], timeout: int = 240, env=None):
    """Run `megatronlite launch` (torchrun, gloo) and return the finished process."""
    import subprocess

    cmd = launch_cmd(run_dir, nproc, overrides, config=config)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def final_weights(run_dir: Path) -> dict:
    """Every global weight of the run's latest checkpoint, read through the layout-free view."""
    from megatronlite.checkpoint import store
    from megatronlite.checkpoint.weights import read_tensors

    step_dir = store.find_step_dir(run_dir)
    names = [k.removeprefix("model.") for k in store.stored_shapes(step_dir) if k.startswith("model.")]
    return dict(read_tensors(step_dir, names))


def error_of(capsys, *args: str) -> str:
    """The one line a failing CLI command prints on stderr (it must exit 2)."""
    import pytest

    from megatronlite.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# What every worker of a job imports: torch (1.9 s of CPU here), dynamo (torch.optim's methods import it) and DCP
# (1.5 s), megatronlite. Forked from a process that has imported them (a forkserver: one per pytest process,
# started on first use), a worker starts in milliseconds instead of ~3.5 s; the equivalence and resume tests start
# hundreds of workers. What a module reads from the environment when it is imported (TRITON_INTERPRET, the
# calibration file, OMP_NUM_THREADS for libgomp) is the server's: a job's `env` reaches what is read at run time.
# And unlike torchrun's workers, all share the server's string-hash seed: one equivalence case goes through
# `launch` (test_parallel_equivalence.py), as the fault, README and Slurm tests do.
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.pipelining",
    "megatronlite.cli",
    "megatronlite.train.trainer",
]


def _forked():
    """The multiprocessing context tests start their workers in: forked from a forkserver holding `_PRELOAD`."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts: on first use, once per pytest process
    return ctx


def _run_all(procs: list, timeout: float) -> tuple[list[int], bool]:
    """Start `procs` and wait until all have ended, one has failed (its peers would wait for it in a collective)
    or `timeout` seconds have passed; kill what is left. (The ranks that failed by themselves, in the order they
    ended; whether the deadline passed.)"""
    import signal
    import time
    from multiprocessing.connection import wait

    failed, running = [], {}
    try:
        # pytest-timeout's alarm waits until every start returned: one landing inside would lose a started worker
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        deadline = time.monotonic() + timeout
        running = {p.sentinel: rank for rank, p in enumerate(procs)}
        while running and not failed and time.monotonic() < deadline:
            for ended in wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                rank = running.pop(ended)
                procs[rank].join()
                if procs[rank].exitcode != 0:
                    failed.append(rank)
    finally:  # also when pytest's own timeout interrupts the wait: no worker outlives its test
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return failed, bool(running) and not failed


def _job_worker(rank: int, world: int, port: int, env: dict, logs: str, fn: tuple[str, str], args: tuple) -> None:
    """One worker of `run_job`, as torchrun starts it: the test's environment (not the forkserver's) with its
    rank's variables, one CPU thread when it shares the node (torchrun's OMP_NUM_THREADS=1), its output to files;
    then `fn(*args)` (fn: module and name, imported once the output goes to the files). multiprocessing ends the
    worker as an interpreter would: non-daemon threads joined, an exception's traceback or a SystemExit's code."""
    import ctypes
    import os
    import signal
    import sys

    import torch

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: ends with the forkserver, i.e. with pytest
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, stream in ((1, "out"), (2, "err")):
        file = os.open(f"{logs}/{rank}.{stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    if world > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    try:
        _resolve(fn)(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _name(fn) -> tuple[str, str]:
    """How a worker finds the module-level `fn`: its module and name, imported there by `_resolve`."""
    return fn.__module__, fn.__name__


def _resolve(fn: tuple[str, str]):
    import importlib

    module, name = fn
    return getattr(importlib.import_module(module), name)


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""  # none from a worker killed on its way up


def run_job(fn, nproc: int, *args, timeout: float = 240, env=None):
    """`fn(*args)` in `nproc` worker processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR...),
    forked (`_forked`) instead of each importing torch afresh: the finished job, as `launch` returns it (stdout:
    every rank's, rank 0 first; stderr: the failed ranks' last; returncode: the first failed worker's). When one
    worker fails the others are stopped, as torchrun does; a job past `timeout` fails with its output."""
    import os
    import subprocess
    import tempfile

    ctx = _forked()
    with tempfile.TemporaryDirectory(prefix="job-logs-") as logs:
        job = (free_port(), dict(os.environ if env is None else env), logs, _name(fn), args)
        procs = [ctx.Process(target=_job_worker, args=(r, nproc, *job)) for r in range(nproc)]
        failed, timed_out = _run_all(procs, timeout)
        stdout = "".join(_read(Path(logs, f"{r}.out")) for r in range(nproc))
        last = [r for r in range(nproc) if r not in failed] + failed  # the failures last: what a tail shows
        stderr = "".join(_read(Path(logs, f"{r}.err")) for r in last)
    if timed_out:
        raise TimeoutError(f"the job still ran after {timeout} s; its output:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    code = procs[failed[0]].exitcode if failed else 0
    return subprocess.CompletedProcess(fn.__name__, code, stdout, stderr)


def _train(argv: list[str]) -> None:
    from megatronlite.cli import main

    main(argv)


def train_job(config, run_dir: Path, nproc: int, overrides: list[str], timeout: float = 240, env=None):
    """`megatronlite train` as a job of `nproc` workers (`run_job`), on the CPU (on a GPU machine the forkserver
    may have initialised CUDA, which forked workers cannot use). The launcher itself, torchrun's agent, is tested
    through `launch` (test_launch_failures.py, test_faults.py, the README's blocks)."""
    argv = ["train", str(config), "--run-dir", str(run_dir), *set_args([*overrides, "train.device=cpu"])]
    return run_job(_train, nproc, argv, timeout=timeout, env=env)


def _in_group(fn: tuple[str, str], timeout: float, *args) -> None:
    """(A worker of `spawn`.) `fn(rank, world, *args)` in a gloo group whose collectives wait as long as the
    parent does (ranks of a loaded machine drift apart; the parent's deadline ends a hang)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    try:
        _resolve(fn)(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run the module-level `fn(rank, world, *args)` in `world` gloo processes; fail (never hang) on any rank's
    error or after `timeout` seconds, killing what is left."""
    done = run_job(_in_group, world, _name(fn), timeout, *args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-6000:]


def workers(fn, nproc: int, *args, timeout: float = 240) -> None:
    """Run the module-level `fn(*args)` in `nproc` workers that make their own process group from torchrun's
    variables (the megatron-core side of a test); fail with the job's output if any fails."""
    done = run_job(fn, nproc, *args, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def skip_without_async_io(overrides: list[str]) -> None:
    """Skip a run that offloads to NVMe where DeepSpeed's async_io op cannot build (no libaio headers)."""
    import pytest

    if "optim.offload=nvme" in overrides:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            pytest.skip("DeepSpeed's async_io op cannot build here (libaio-dev is not installed)")
