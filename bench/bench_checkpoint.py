"""Checkpoint save/load throughput against the raw disk, async blocking, loading into another layout, and
saves with the distributed optimizer (ZeRO-1) in place against gathering the Adam states first.

    python bench/bench_checkpoint.py [--part all|throughput|zero] [--layers 12] [--markdown bench/results/checkpoint.md]

throughput: in one torchrun job of 2 CPU processes, `dd` writes the state's size with fsync (the
disk's raw rate); a llama of ~134M parameters at tp2 saves its weights and Adam states (about
1.6 GB) synchronously and asynchronously; the checkpoint then loads into the same layout (tp2) and
into another (pp2).

zero: the same model with the distributed optimizer at dp2 and at dp4 (a torchrun job each) saves
as megatronlite does, each rank writing its own slices of the Adam states, and as earlier versions
did, all-gathering every state to full size first (kept here only as the baseline). Peak extra
memory is the largest growth of a rank's anonymous resident memory during the save (glibc told to
return freed memory at once), the most of any rank.

Each figure is the median of --repeats runs. `--layers` shrinks the model for a quick check.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from common import emit, run_under_torchrun

MODEL = [
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
ADAM = ("exp_avg", "exp_avg_sq")


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


def worker(workdir: Path, repeats: int, layers: int) -> None:
    from megatronlite import config as config_mod
    from megatronlite.engine.native import ensure_optimizer_state
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    world, rank, _ = init_distributed("cpu", 30)

    def trainer(layout: list[str], run: Path, extra=()) -> Trainer:
        sets = MODEL + [f"model.num_layers={layers}"] + layout + list(extra) + ["train.device=cpu"]
        cfg = config_mod.load("configs/demo.yaml", sets)
        t = Trainer(cfg, run, build_mesh(cfg, world, rank), torch.device("cpu"))
        ensure_optimizer_state(t.engine.optimizer)
        return t

    src = trainer(["parallel.tensor=2"], workdir / "run")
    saver = checkpointing.Checkpointer(src)
    async_src = trainer(["parallel.tensor=2", "checkpoint.async=true"], workdir / "run")
    async_saver = checkpointing.Checkpointer(async_src)
    pieces = src.state_tensors(True)  # at pp1 every rank has every global key
    state_bytes = sum({p.key: math.prod(p.global_shape) * 4 for p in pieces}.values())
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


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def _measured(fn: Callable[[], None]) -> tuple[float, int]:
    """(Every rank.) Seconds from a common start until every rank is done, and the most any rank's anonymous
    resident memory grew above its start meanwhile (sampled every millisecond)."""
    base, peak, done = _rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seconds = _barrier_time(fn)
    finally:
        done.set()
        sampler.join()
    grown = torch.tensor(max(peak[0], _rss_anon()) - base, dtype=torch.float64)
    dist.all_reduce(grown, op=dist.ReduceOp.MAX)
    return seconds, int(grown.item())


def gathered_state_tensors(trainer) -> Callable[[bool], list]:
    """The baseline: `Trainer.state_tensors` as saves were before ZeRO-1 shards were saved in place, every Adam
    state all-gathered over the grad group to full size on every rank (DCP's dedup then writes each once)."""
    from megatronlite.checkpoint.views import model_pieces, stored_name, tensor_pieces

    def state_tensors(for_save: bool) -> list:
        pieces = model_pieces(trainer.params, trainer.mesh, for_save)
        name_of = {id(p): n for n, p in trainer.params.items()}
        for bucket in trainer.engine.dp.buckets:
            lo, hi = bucket.shard_range
            base = bucket.param_buf.data_ptr()
            for key in ADAM:
                mine = torch.zeros(hi - lo)
                for o in bucket.owned:
                    at = (o.shard.data_ptr() - base) // o.shard.element_size() - lo
                    mine[at : at + o.shard.numel()] = trainer.engine.optimizer.state[o.shard][key]
                full = torch.empty_like(bucket.grad_buf)
                dist.all_gather_into_tensor(full, mine, group=trainer.engine.dp.group.pg)
                for p in bucket.params:
                    name = stored_name(name_of[id(p)], p.sharding, for_save)
                    if name is not None:
                        start = (p.data_ptr() - base) // p.element_size()
                        value = full[start : start + p.numel()].view_as(p)
                        pieces += tensor_pieces(f"optim.{key}.{name}", value, p.sharding, trainer.mesh)
        return pieces

    return state_tensors


def zero_worker(workdir: Path, repeats: int, layers: int) -> None:
    """(A rank of a dpN job.) Saves with the distributed optimizer: in place, and gathering first."""
    from megatronlite import config as config_mod
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    world, rank, _ = init_distributed("cpu", 30)
    sets = [f"model.num_layers={layers}", "parallel.distributed_optimizer=true", f"train.global_batch_size={world}"]
    cfg = config_mod.load("configs/demo.yaml", MODEL + sets + ["train.device=cpu"])
    trainer = Trainer(cfg, workdir / "run", build_mesh(cfg, world, rank), torch.device("cpu"))
    saver = checkpointing.Checkpointer(trainer)  # makes the Adam states
    in_place = trainer.state_tensors
    results: dict[str, list[float]] = {"inplace_s": [], "inplace_mb": [], "gather_s": [], "gather_mb": []}
    for _ in range(repeats):
        for name, state_tensors in (("inplace", in_place), ("gather", gathered_state_tensors(trainer))):
            trainer.state_tensors = state_tensors
            trainer.step += 1
            seconds, grown = _measured(saver.save)
            results[f"{name}_s"].append(seconds)
            results[f"{name}_mb"].append(grown / 2**20)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in results.items()}
        line = " ".join(f"{k}={v:.3f}" for k, v in med.items())
        print(f"RESULT dp={world} state_gb={saver.needed / 1e9:.3f} {line}", flush=True)
    dist.destroy_process_group()


def _run(args: list[str], nproc: int, env: dict[str, str] | None = None) -> dict[str, float]:
    """One torchrun job of this script in a fresh directory; the numbers of its RESULT line."""
    workdir = Path(tempfile.mkdtemp(prefix="mlite-ckpt-bench-", dir=os.environ.get("BENCH_DIR", ".")))
    try:
        done = run_under_torchrun(__file__, ["--workdir", str(workdir), *args], nproc=nproc, env=env)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(done.stderr[-3000:])
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", choices=("all", "throughput", "zero"), default="all")
    ap.add_argument(
        "--layers", type=int, default=12, help="model.num_layers (12: ~134M parameters; even, for the pp2 load)"
    )
    ap.add_argument("--markdown")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--zero", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workdir:
        (zero_worker if args.zero else worker)(Path(args.workdir), args.repeats, args.layers)
        return
    common = ["--repeats", str(args.repeats), "--layers", str(args.layers)]
    command = f"python bench/bench_checkpoint.py --part {args.part} --layers {args.layers} --repeats {args.repeats}"
    load = os.getloadavg()[0]
    if args.part in ("all", "throughput"):
        emit(throughput_table(_run(common, nproc=2), command, load, args.repeats, args.layers), args.markdown)
    if args.part in ("all", "zero"):
        returned_at_once = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set at once
        runs = {dp: _run([*common, "--zero"], nproc=dp, env=returned_at_once) for dp in (2, 4)}
        emit(zero_table(runs, command, load, args.repeats, args.layers), args.markdown)


def throughput_table(r: dict[str, float], command: str, load: float, repeats: int, layers: int) -> str:
    gb = r["state_gb"]
    lines = [
        f"## Checkpoint throughput, {datetime.date.today()}",
        "",
        f"- command: `{command}`",
        f"- machine: 2 CPU cores, gloo, 2 processes (tp2); load average at start {load:.1f}",
        f"- state: llama of {layers} layers, weights + Adam moments = {gb:.2f} GB; medians of {repeats} runs",
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
    return "\n".join(lines)


def zero_table(runs: dict[int, dict[str, float]], command: str, load: float, repeats: int, layers: int) -> str:
    lines = [
        f"## Saves with the distributed optimizer (ZeRO-1), {datetime.date.today()}",
        "",
        f"- command: `{command}`",
        f"- machine: 2 CPU cores, gloo, one process per DP rank; load average at start {load:.1f}",
        f"- state: llama of {layers} layers, weights + Adam moments = {runs[2]['state_gb']:.2f} GB; "
        f"medians of {repeats} runs",
        "",
        "| layout | save | seconds | peak extra memory, MB (most of any rank) |",
        "|---|---|---|---|",
    ]
    for dp, r in runs.items():
        lines.append(f"| dp{dp} | in place: each rank its own slices | {r['inplace_s']:.2f} | {r['inplace_mb']:.0f} |")
        lines.append(f"| dp{dp} | gather to full size, then save | {r['gather_s']:.2f} | {r['gather_mb']:.0f} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
