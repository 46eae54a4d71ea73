"""Checkpoint save/load throughput against the raw disk, async blocking, and loading into another layout.

    python bench/bench_checkpoint.py [--markdown bench/results/checkpoint.md]

In one torchrun job of 2 CPU processes: `dd` writes the state's size with fsync (the disk's raw
rate); a llama of ~134M parameters at tp2 saves its weights and Adam states (about 1.6 GB)
synchronously and asynchronously; the checkpoint then loads into the same layout (tp2) and into
another (pp2). Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import emit, run_under_torchrun

MODEL = [
    "model.num_layers=12",
    "model.hidden_size=768",
    "model.num_heads=12",
    "model.num_kv_heads=12",
    "model.ffn_hidden_size=2048",
    "model.vocab_size=32000",
    "model.max_seq_len=256",
    "train.seq_len=256",
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "checkpoint.keep=10",
]


def _barrier_time(fn) -> float:
    """Seconds from a common start until every rank is done."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _held_time(fn) -> float:
    """Seconds from a common start until fn returns, on the slowest rank: how long training is held
    (after an async save returns, the next step starts; no rank waits for the others)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    held = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    return held.item()


def worker(workdir: Path, repeats: int) -> None:
    from megatronlite import config as config_mod
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    world, rank, _ = init_distributed("cpu", 30)

    def trainer(layout: list[str], run: Path, extra=()) -> Trainer:
        cfg = config_mod.load("configs/demo.yaml", MODEL + layout + list(extra) + ["train.device=cpu"])
        t = Trainer(cfg, run, build_mesh(cfg, world, rank), torch.device("cpu"))
        checkpointing.ensure_optimizer_state(t.optimizer)
        return t

    src = trainer(["parallel.tensor=2"], workdir / "run")
    saver = checkpointing.Checkpointer(src)
    async_src = trainer(["parallel.tensor=2", "checkpoint.async=true"], workdir / "run")
    async_saver = checkpointing.Checkpointer(async_src)
    pieces = src.state_tensors(True, src.optimizer_states())  # at pp1 every rank has every global key
    state_bytes = sum(math.prod(p.global_shape) * 4 for p in pieces.values())
    results: dict[str, list[float]] = {
        "dd": [],
        "save": [],
        "async_blocked": [],
        "async_total": [],
        "load_same": [],
        "load_other": [],
    }
    for i in range(repeats):
        if rank == 0:
            out = workdir / "dd.bin"
            start = time.perf_counter()
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={state_bytes // 2**20}", "conv=fsync"],
                check=True,
                capture_output=True,
            )
            results["dd"].append(time.perf_counter() - start)
            out.unlink()
        src.step = 10 * i + 1
        results["save"].append(_barrier_time(saver.save))
        src.step = 10 * i + 2
        async_src.step = src.step
        results["async_blocked"].append(_held_time(async_saver.save))
        start = time.perf_counter()
        async_saver.wait()
        results["async_total"].append(results["async_blocked"][-1] + time.perf_counter() - start)
    ckpt = workdir / "run" / "checkpoints"
    same = trainer(["parallel.tensor=2"], workdir / "same", [f"checkpoint.load={ckpt}"])
    other = trainer(["parallel.pipeline=2"], workdir / "other", [f"checkpoint.load={ckpt}"])
    for _ in range(repeats):
        results["load_same"].append(_barrier_time(lambda: checkpointing.maybe_resume(same)))
        results["load_other"].append(_barrier_time(lambda: checkpointing.maybe_resume(other)))
    if rank == 0:
        med = {k: statistics.median(v) for k, v in results.items()}
        gb = state_bytes / 1e9
        print(f"RESULT state_gb={gb:.3f} " + " ".join(f"{k}={v:.3f}" for k, v in med.items()), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workdir:
        worker(Path(args.workdir), args.repeats)
        return
    workdir = Path(tempfile.mkdtemp(prefix="mlite-ckpt-bench-", dir=os.environ.get("BENCH_DIR", ".")))
    try:
        done = run_under_torchrun(__file__, ["--workdir", str(workdir), "--repeats", str(args.repeats)])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(done.stderr[-3000:])
    r = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    gb = r["state_gb"]
    lines = [
        f"## Checkpoint throughput, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_checkpoint.py --repeats {args.repeats}`",
        f"- machine: 2 CPU cores, gloo, 2 processes (tp2); load average at start {os.getloadavg()[0]:.1f}",
        f"- state: llama 134M parameters, weights + Adam moments = {gb:.2f} GB; medians of {args.repeats} runs",
        "",
        "| what | seconds | GB/s | vs raw disk |",
        "|---|---|---|---|",
        f"| dd of the same size, conv=fsync (raw disk) | {r['dd']:.2f} | {gb / r['dd']:.2f} | 100% |",
        f"| sync save (DCP, fsync, atomic commit) | {r['save']:.2f} | {gb / r['save']:.2f} | "
        f"{100 * r['dd'] / r['save']:.0f}% |",
        f"| async save: training blocked | {r['async_blocked']:.3f} | | "
        f"{100 * r['async_blocked'] / r['save']:.1f}% of the sync save |",
        f"| async save: until committed | {r['async_total']:.2f} | {gb / r['async_total']:.2f} | |",
        f"| load into the same layout (tp2) | {r['load_same']:.2f} | {gb / r['load_same']:.2f} | |",
        f"| load into another layout (pp2) | {r['load_other']:.2f} | {gb / r['load_other']:.2f} | "
        f"{r['load_other'] / r['load_same']:.2f}x the same-layout load |",
        "",
    ]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
