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


def train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """`megatronlite train configs/demo.yaml` in this process; the run's metrics records."""
    from megatronlite.cli import main

    args = ["train", "configs/demo.yaml", "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    main(args)
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
    cmd += ["--master-port", str(free_port()), "--run-dir", str(run_dir), *extra]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


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


def _spawned(rank: int, world: int, port: int, timeout: float, fn, args: tuple, errors) -> None:
    """One spawned gloo worker: `fn(rank, world, *args)`, its failure reported to the parent. Its collectives
    wait as long as the parent does (ranks of a loaded machine drift apart; the parent's deadline ends a hang)."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()
    # done and reported: skip the interpreter's teardown, where gloo's threads may abort the process
    # ("terminate called without an active exception") after the work has succeeded
    os._exit(0)


def spawn(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run the module-level `fn(rank, world, *args)` in `world` gloo processes; fail (never hang) on any rank's
    error or after `timeout` seconds, killing what is left."""
    import time
    from multiprocessing.connection import wait

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, timeout, fn, args, errors)) for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        running = {p.sentinel: p for p in procs}
        failed = False
        while running and not failed and time.monotonic() < deadline:  # all ended, or one failed (its peers wait)
            for ended in wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                p = running.pop(ended)
                p.join()
                failed = failed or p.exitcode != 0
    finally:  # also when pytest's own timeout interrupts the wait: no worker outlives its test
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert all(p.exitcode == 0 for p in procs) and not messages, messages or [p.exitcode for p in procs]


def torchrun_script(script: str, nproc: int, *args: object, timeout: float = 240) -> None:
    """Run `script args` as `nproc` gloo workers under torchrun (the megatron-core side of a test); a worker that
    fails or a job past `timeout` fails the test with the job's log."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("megatron.core")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script]
    proc = subprocess.Popen(
        [*run, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log[-6000:]


def skip_without_async_io(overrides: list[str]) -> None:
    """Skip a run that offloads to NVMe where DeepSpeed's async_io op cannot build (no libaio headers)."""
    import pytest

    if "optim.offload=nvme" in overrides:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            pytest.skip("DeepSpeed's async_io op cannot build here (libaio-dev is not installed)")
