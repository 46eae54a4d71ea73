"""The planner against real runs on this CPU: its constants measured here, its efficiency fitted to one run.

    python bench/bench_plan_cpu.py [--steps 12] [--markdown bench/results/plan.md]

The planner models a GPU by its peak FLOP/s, memory bandwidth, link bandwidth and latency. Here the "device"
is a worker process: its peak is a large fp32 matmul's rate at the worker's thread count (workers beyond the
cores share them), its memory bandwidth a large copy's, its links gloo's all-reduce bus bandwidth and small-
message latency between two workers. The matmul efficiency is fitted (`plan --calibrate`'s bisection) to the
one-process run of the demo model; every other layout's step time is then a prediction, set beside the
measured one (the median logged step, warm-up left out). Model-state bytes predicted for rank 0 are set beside
what the trainer's own code allocates for it (plan/measure.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, run_under_torchrun

from megatronlite import config
from megatronlite.plan import calibrate, hardware
from megatronlite.plan.estimate import Planner
from megatronlite.plan.layout import layout_of
from megatronlite.plan.measure import allocated_states
from megatronlite.plan.memory import model_states

CORES = os.cpu_count() or 1
RUN = ["train.eval_interval=0", "logging.interval=1", "checkpoint.save=false", "checkpoint.load=null"]
LAYOUTS = [  # (name, workers, overrides)
    ("one process", 1, []),
    ("tp2", 2, ["parallel.tensor=2"]),
    ("tp2 sp", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("pp2", 2, ["parallel.pipeline=2"]),
    ("dp2", 2, []),
    ("dp2 zero1", 2, ["parallel.zero_stage=1"]),
    ("dp2 zero2", 2, ["parallel.zero_stage=2"]),
    ("cp2", 2, ["parallel.context=2"]),
    ("tp2 x pp2 sp", 4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]),
]


def threads_for(workers: int) -> int:
    return max(1, CORES // workers)


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` calls, in seconds (the least disturbed by other tenants)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / timed(lambda: a @ b, 20)


def copy_bandwidth() -> float:
    src = torch.empty(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), 10)  # read and write


def collectives() -> dict:
    """Run under torchrun: gloo all-reduce latency (4 bytes) and bus bandwidth (16 MiB) between the workers."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    n = dist.get_world_size()
    small, large = torch.zeros(1), torch.zeros(16 * 2**20 // 4)
    latency = timed(lambda: dist.all_reduce(small), 50)
    seconds = timed(lambda: dist.all_reduce(large), 5)
    if dist.get_rank() == 0:
        print(json.dumps({"latency": latency, "bus_bandwidth": 2 * (n - 1) / n * large.nbytes / seconds}))
    dist.destroy_process_group()
    return {}


def device(workers: int, links: dict) -> hardware.GPU:
    """This machine as the planner's device for a layout of `workers` processes."""
    share = min(1.0, CORES / workers)  # workers beyond the cores take turns
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / workers
    bandwidth = links["bus_bandwidth"]
    return hardware.GPU(
        matmul_rate(threads_for(workers)) * share, memory, copy_bandwidth(), bandwidth, bandwidth, links["latency"]
    )


def train(run_dir: Path, workers: int, sets: list[str], steps: int) -> None:
    sets = [*sets, *RUN, f"train.steps={steps}", f"train.threads={threads_for(workers)}"]
    args = ["configs/demo.yaml", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "megatronlite"]
    cmd += ["train", *args] if workers == 1 else ["launch", f"--nproc-per-node={workers}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def row(name: str, workers: int, cfg: config.Config, run_dir: Path, hw: hardware.GPU, eff: float) -> str:
    layout = layout_of(cfg, workers)
    estimate = Planner(cfg, workers, workers, hw, eff).estimate(layout)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    measured = tokens / calibrate.measured_tokens_per_sec(run_dir)
    parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in estimate.time.parts().items() if v * 1e3 >= 0.5)
    states = model_states(cfg, workers, 0)
    predicted = states.weights + states.grads + states.optimizer
    allocated = sum(allocated_states(cfg, workers, 0).values())
    return (
        f"| {name} | {workers} x {threads_for(workers)} | {estimate.time.total * 1e3:.0f} ({parts}) | "
        f"{measured * 1e3:.0f} | {estimate.time.total / measured - 1:+.0%} | {predicted / 2**20:.2f} / "
        f"{allocated / 2**20:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--markdown", help="append the result to this file")
    ap.add_argument("--collectives", action="store_true", help=argparse.SUPPRESS)  # the torchrun worker
    args = ap.parse_args()
    if args.collectives:
        collectives()
        return
    done = run_under_torchrun(__file__, ["--collectives"])
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    links = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        efficiency = None
        for name, workers, sets in LAYOUTS:
            run_dir = Path(tmp) / name.replace(" ", "-")
            train(run_dir, workers, sets, args.steps)
            cfg = config.load(run_dir / "config.yaml")
            hw = device(workers, links)
            if efficiency is None:  # the one-process run calibrates; the rest are predictions
                efficiency = calibrate.fit(run_dir, 1, 1, hw)
            rows.append(row(name, workers, cfg, run_dir, hw, efficiency))
    lines = [
        f"## The planner against CPU runs, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_plan_cpu.py --steps {args.steps}`; machine: {platform.machine()}, "
        f"{CORES} cores, torch {torch.__version__}; the demo model (configs/demo.yaml), fp32",
        f"- measured here: fp32 matmul {matmul_rate(CORES) / 1e9:.1f} GFLOP/s on {CORES} threads, copy "
        f"{copy_bandwidth() / 1e9:.1f} GB/s, gloo all-reduce between 2 workers {links['bus_bandwidth'] / 1e9:.2f} "
        f"GB/s bus bandwidth and {links['latency'] * 1e6:.0f} us latency",
        f"- efficiency fitted to the one-process run: {efficiency:.3f}; every other row is a prediction",
        "",
        "| layout | workers x threads | predicted step, ms (parts) | measured step, ms | error "
        "| rank 0 model states, MiB: predicted / allocated |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
