"""Context parallelism on CPU: step time of cp2 against one process, bytes moved, memory per rank.

    python bench/bench_context.py [--config configs/demo.yaml] [--seq-len 2048] [--steps 4]
        [--markdown bench/results/context_cpu.md]

Runs the demo model at a long sequence with one process, then with parallel.context=2 for the
ring and the all-gather attention (2 gloo processes each, through torchrun, one after the
other), each timing `--steps` training steps after a warm-up step. On rank 0 it counts the
payload of every point-to-point and collective call of one step (bench/collective_bytes.py's
counters) and prints it beside the analytic count:

- ring, per layer and micro-batch: K/V (2 x b x kv_heads x S/C x head_dim) goes round the ring
  C - 1 times forward and C - 1 times backward, and its gradient (fp32) C times: 3C - 2 sends.
- all-gather: K/V gathered once forward (the per-rank input counted), its gradient
  reduce-scattered once backward (the C gradient blocks passed in counted).
- both: every gradient all-reduced once over dp x cp (the whole model here), plus a few scalars.

Memory: each process's peak resident set (ru_maxrss), and the analytic bytes of one attention
score block (fp32): the ring computes one chunk pair [b, heads, S/2C, S/2C] at a time (its backward
a few such blocks); one process's CPU flash attention keeps no S x S matrix, the math fallback (and
the all-gather variant's masked attention on paths without a fused kernel) [b, heads, S/C, S].
On 2 cores a slowdown is expected: the two processes share the cores one process had.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from collective_bytes import install_counters
from common import emit, run_under_torchrun

CORES = os.cpu_count() or 1
RUNS = {
    "1 process": (1, []),
    "cp2 ring": (2, ["parallel.context=2", "parallel.context_attention=ring"]),
    "cp2 allgather": (2, ["parallel.context=2", "parallel.context_attention=allgather"]),
}


def worker(config: str, sets: list[str], steps: int) -> None:
    counts: dict[str, int] = defaultdict(int)
    active = [False]
    install_counters(counts, active)
    from pathlib import Path

    from megatronlite import config as config_mod
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train.trainer import Trainer

    cfg = config_mod.load(config, sets + ["checkpoint.save=false", "train.device=cpu"])
    world, rank, _ = init_distributed("cpu", 10)
    trainer = Trainer(cfg, Path("/tmp/bench-context"), build_mesh(cfg, world, rank), torch.device("cpu"))
    loader = iter(trainer._loader(trainer.train_ds, 0))
    trainer.train_step(next(loader))  # warm-up
    active[0] = True
    trainer.train_step(next(loader))
    active[0] = False
    times = []
    for _ in range(steps):
        batch = next(loader)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    loader.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        print("RESULT " + json.dumps({"counts": dict(counts), "times": times, "peak_rss": peak}))
    if world > 1:
        dist.destroy_process_group()


def expected(cfg, impl: str) -> dict[str, int]:
    from megatronlite.models.counting import parameter_count

    m, t, c = cfg.model, cfg.train, cfg.parallel.context
    n_micro = t.global_batch_size // t.micro_batch_size
    kv = 2 * t.micro_batch_size * m.kv_heads * (t.seq_len // c) * m.head_dim * 4
    grads = parameter_count(m) * 4
    if impl == "ring":
        sends = m.num_layers * n_micro * (3 * c - 2) * kv
        return {"isend": sends, "irecv": sends, "all_reduce": grads}
    return {
        "all_gather": m.num_layers * n_micro * kv,
        "reduce_scatter": m.num_layers * n_micro * kv * c,
        "all_reduce": grads,
    }


def score_bytes(cfg) -> int:
    """One score block's bytes: a chunk pair for the ring, local queries x every key otherwise."""
    m, t, c = cfg.model, cfg.train, cfg.parallel.context
    rows, cols = t.seq_len // c, t.seq_len
    if c > 1 and cfg.parallel.context_attention == "ring":
        rows = cols = t.seq_len // (2 * c)
    return t.micro_batch_size * m.num_heads * rows * cols * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    common = [
        f"train.seq_len={args.seq_len}",
        f"model.max_seq_len={args.seq_len}",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
    ]
    if args.case:
        worker(args.config, common + RUNS[args.case][1], args.steps)
        return
    from megatronlite import config as config_mod

    lines = [
        f"## Context parallelism on CPU, {args.config} at seq {args.seq_len}, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_context.py --seq-len {args.seq_len} --steps {args.steps}`",
        f"- machine: {platform.machine()}, {CORES} cores (1 process: {CORES} threads; cp2: 1 thread per process), "
        f"torch {torch.__version__}",
        "- batch: 2 sequences per step (micro-batch 1); step time = median of the timed steps",
        "",
        "| run | step s (median) | vs 1 process | peak RSS rank 0 | one score block | bytes moved (rank 0) |",
        "|---|---|---|---|---|---|",
    ]
    base = None
    for name, (nproc, sets) in RUNS.items():
        # the same cores for every run: one process with all threads, or one thread per process
        threads = {"OMP_NUM_THREADS": str(max(1, CORES // nproc))}
        done = run_under_torchrun(__file__, [*sys.argv[1:], "--case", name], nproc=nproc, env=threads)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
        step = sorted(result["times"])[len(result["times"]) // 2]
        base = base or step
        cfg = config_mod.load(args.config, common + sets)
        cp = cfg.parallel.context
        moved = "—"
        if cp > 1:
            exp = expected(cfg, cfg.parallel.context_attention)
            moved = "; ".join(
                f"{kind} {result['counts'].get(kind, 0):,} (expected {want:,})" for kind, want in sorted(exp.items())
            )
        lines.append(
            f"| {name} | {step:.2f} | {step / base:.2f}x | {result['peak_rss'] / 2**20:.0f} MiB | "
            f"{score_bytes(cfg) / 2**20:.1f} MiB | {moved} |"
        )
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
