"""One command that proves the GPU path: GPU tests, training and kernel benchmarks, checkpoint timing, one report.

    python bench/gpu_check.py [--results DIR] [--dry-run] [--budget SECONDS]

`make gpu-check` runs it on a lent GPU machine after installing the project from `.whl/` (the Makefile
and bench/gpu_kit.sh, which also works without make). Each step runs in its own process group with its
own timeout, capped by what is left of `--budget` (the whole check has to fit the machine's 10-minute
command limit, install included); a step that fails or times out is recorded with the tail of its
output and the next step runs. The
report, `DIR/gpu_check_<GPU>_<date>.md`, is rewritten after every step, so a check killed from
outside still leaves what it measured. Exit status 1 when any step failed.

`--dry-run` runs the same steps on a machine without CUDA at tiny sizes, torch.compile disabled
(TORCH_COMPILE_DISABLE=1: the code path runs, inductor's minutes of CPU compilation do not), so CI
catches a kit that would break on the GPU machine (tests/test_gpu_check.py). Its numbers mean nothing.

`--checkpoint-timing CONFIG` is the checkpoint step itself (run by the check in a child process):
megatronlite's own save and load of a whole training state, weights and Adam states, to local disk.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the tiny model every training step shrinks to in a dry run
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=257",  # the byte tokenizer's, which the checkpoint step's data uses
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
]
TAIL_LINES = 80


@dataclass
class Step:
    """One part of the check: a command, its time limit, and where its markdown (if any) lands."""

    name: str
    argv: list[str]
    timeout_s: float
    markdown: Path | None = None  # a bench's own table, embedded in the report
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why this step does not run here


@dataclass
class Outcome:
    status: str  # ok | failed | timeout | skipped
    seconds: float
    detail: str  # markdown for the step's section


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def steps(dry_run: bool, work: Path) -> list[Step]:
    """The check, most important first (a short budget cuts the last ones)."""
    py = sys.executable
    train_mode = ["--steps", "2", "--rounds", "1"] if dry_run else ["--steps", "4", "--rounds", "3"]
    no_compile = {"TORCH_COMPILE_DISABLE": "1"} if dry_run else {}
    # -v: a step killed by its time limit still names the tests it ran (the report keeps the output's tail)
    pytest = [py, "-m", "pytest", "-m", "gpu", "-v", "--tb=short", "-rs", "-p", "no:cacheprovider"]

    def train(name: str, preset: str, shape: list[str], timeout_s: float, skip: str | None = None) -> Step:
        out = work / f"{name.replace(' ', '_')}.md"
        argv = [py, "bench/bench_train.py", "--config", f"configs/models/{preset}.yaml", "--precision", "bf16"]
        argv += ["--compile", "both", *train_mode, *_sets(TINY if dry_run else shape), "--markdown", str(out)]
        return Step(name, argv, timeout_s, out, no_compile, skip)

    kernels_md = work / "kernels.md"
    # the goal's shapes (the 1B preset); no torch.compile column: a cold compile per op would not fit the step
    kernel_args = ["--size", "tiny" if dry_run else "llama1b", "--iters", "1" if dry_run else "10", "--no-compile"]
    return [
        # only the GPU tests' module: collecting the whole suite would need its CPU-only dependencies too
        Step("pytest -m gpu", [*pytest, "tests/test_gpu.py"], 180),  # cold caches: every Triton kernel compiles
        train(
            # micro-batches of one sequence: megatron-core's unfused attention (no Transformer Engine in the image)
            # keeps fp32 scores of 32 x 4096 x 4096 per sequence and layer, ~100 GB for two sequences in 16 layers
            "train 1B",
            "llama-1b",
            ["train.seq_len=4096", "train.micro_batch_size=1", "train.global_batch_size=2"],
            150,
        ),
        Step("kernels", [py, "bench/bench_kernels.py", *kernel_args, "--markdown", str(kernels_md)], 60, kernels_md),
        train(
            "train 125M",
            "llama-125m",
            ["train.seq_len=2048", "train.micro_batch_size=8", "train.global_batch_size=8"],
            60,
            "dry run: the same tiny model as `train 1B`" if dry_run else None,
        ),
        Step(
            "checkpoint save/load",
            [py, "bench/gpu_check.py", "--checkpoint-timing", "configs/models/llama-1b.yaml", "--work", str(work)]
            + _sets(TINY if dry_run else []),
            90,
        ),
    ]


def run_step(step: Step, timeout_s: float) -> Outcome:
    """Run one step in a new process group (killed whole on timeout: compile workers too)."""
    if step.skip:
        return Outcome("skipped", 0.0, step.skip)
    if step.markdown:
        step.markdown.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        step.argv,
        cwd=REPO,
        env={**os.environ, **step.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - start
    parts = []
    if step.markdown and step.markdown.exists():
        parts.append(step.markdown.read_text().strip())
    if status != "ok" or not parts:
        why = {"ok": "output", "failed": f"exit status {proc.returncode}", "timeout": f"killed after {timeout_s:.0f} s"}
        tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
        parts.append(f"{why[status]}, last lines:\n\n```text\n{tail}\n```")
    return Outcome(status, seconds, "\n\n".join(parts))


def _version(dist: str) -> str:
    from megatronlite.version import installed

    return installed(dist) or "absent"


def machine() -> tuple[str, list[str]]:
    """(GPU name for the file name, report lines on the machine and its software). Creates no CUDA context."""
    if torch.cuda.is_available():
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            gpu, driver, memory = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split(", ")
        except (OSError, subprocess.CalledProcessError, ValueError) as e:
            gpu, driver, memory = torch.cuda.get_device_name(), f"unknown ({type(e).__name__})", "?"
        gpu_line = f"{gpu} x{torch.cuda.device_count()}, {memory.strip()}, driver {driver}"
        short = re.sub(r"[^A-Za-z0-9.]+", "-", gpu.removeprefix("NVIDIA").strip()).strip("-")
    else:
        gpu_line, short = "none (no CUDA device)", "cpu"
    software = ", ".join(
        f"{name} {_version(dist)}"
        for name, dist in [
            ("triton", "triton"),
            ("transformers", "transformers"),
            ("megatron-core", "megatron-core"),
            ("Transformer Engine", "transformer_engine"),
            ("apex", "apex"),
        ]
    )
    return short, [
        f"- GPU: {gpu_line}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs",
        f"- {software}",
    ]


def report(title: str, header: list[str], plan: list[Step], done: dict[int, Outcome]) -> str:
    """The markdown file: the machine, one row per step (in plan order), then each finished step's section."""
    lines = [title, "", *header, "", "| step | status | seconds | command |", "|---|---|---:|---|"]
    for i, step in enumerate(plan):
        command = " ".join(Path(a).name if a == sys.executable else a for a in step.argv)
        out = done.get(i)
        lines.append(
            f"| {step.name} | {out.status} | {out.seconds:.1f} | `{command}` |"
            if out
            else f"| {step.name} | not run yet | | |"
        )
    for i, step in enumerate(plan):
        if i in done:
            lines += ["", f"## {step.name}: {done[i].status}", "", done[i].detail]
    return "\n".join(lines) + "\n"


def check(results: Path, dry_run: bool, budget_s: float, work: Path) -> int:
    """Run every step within the budget, rewriting the report after each; 1 when any step failed.

    On the GPU one step at a time (they measure); a dry run's numbers mean nothing, so its steps share the CPU."""
    if not (dry_run or torch.cuda.is_available()):
        raise SystemExit("gpu_check: no CUDA device here; `--dry-run` runs the check's steps on CPU at tiny sizes")
    start, today = time.perf_counter(), datetime.date.today()
    gpu, header = machine()
    mode = "dry run, tiny sizes: the numbers only show the kit works" if dry_run else "full"
    header += [f"- `python bench/gpu_check.py{' --dry-run' if dry_run else ''}` ({mode}), budget {budget_s:.0f} s"]
    name = f"gpu_check_{gpu}{'-dry-run' if dry_run else ''}_{today}.md"
    title = f"# GPU check: {gpu}{' (dry run)' if dry_run else ''}, {today}"
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan, done = steps(dry_run, work), {}

    def run_in_budget(step: Step) -> Outcome:
        left = budget_s - (time.perf_counter() - start)
        if left < 5 and not step.skip:
            return Outcome("skipped", 0.0, f"out of time: {left:.0f} s of the budget left")
        print(f"gpu_check: {step.name} (up to {min(step.timeout_s, left):.0f} s)", flush=True)
        return run_step(step, min(step.timeout_s, left))

    with ThreadPoolExecutor(len(plan) if dry_run else 1) as pool:
        running = {pool.submit(run_in_budget, step): i for i, step in enumerate(plan)}
        for future in as_completed(running):
            i = running[future]
            done[i] = future.result()
            (results / name).write_text(report(title, header, plan, done))
            print(f"gpu_check: {plan[i].name}: {done[i].status} in {done[i].seconds:.1f} s", flush=True)
    print(f"gpu_check: wrote {results / name}")
    return int(any(out.status in ("failed", "timeout") for out in done.values()))


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _raw_write_seconds(path: Path, n_bytes: int) -> float:
    """Seconds to write n_bytes with one fsync: the disk's own rate, for comparison."""
    block = bytes(64 * 2**20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, n_bytes, len(block)):
            f.write(block[: n_bytes - offset])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def checkpoint_timing(config_path: str, overrides: list[str], work: Path) -> None:
    """Save, then load, a whole training state through megatronlite's checkpointing; print markdown lines."""
    from megatronlite import config
    from megatronlite.checkpoint import store
    from megatronlite.engine.native import ensure_optimizer_state
    from megatronlite.parallel.mesh import build_mesh
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    run = work / "checkpoint_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = config.load(config_path, [f"data.cache_dir={work / 'cache'}", *overrides])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    trainer = Trainer(cfg, run, build_mesh(cfg, 1, 0), device)
    ensure_optimizer_state(trainer.engine.optimizer)
    saver = checkpointing.Checkpointer(trainer)
    trainer.step = 1
    start = time.perf_counter()
    saver.save()
    saver.wait()
    save_s = time.perf_counter() - start
    step_dir = store.latest_complete(run / "checkpoints")
    if step_dir is None:
        raise SystemExit("the save committed no checkpoint (its reason is printed above)")
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    for p in files:  # so the load reads the disk, not the page cache the save just filled
        _drop_from_page_cache(p)
    size = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    checkpointing.load(trainer, step_dir)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    shutil.rmtree(run)  # first: the disk need not hold the checkpoint and its raw copy at once (15 GB each at 1B)
    raw_s = _raw_write_seconds(work / "raw.bin", size)
    gb = size / 1e9
    m = cfg.model
    print(
        "\n".join(
            [
                f"- model: {config_path} ({m.num_layers} layers, h={m.hidden_size}), weights and Adam states "
                f"in fp32 on {device}: {gb:.2f} GB in {len(files)} files under {work.resolve()}",
                f"- save (synchronous, committed): {save_s:.2f} s, {gb / save_s:.2f} GB/s",
                f"- load (page cache dropped first): {load_s:.2f} s, {gb / load_s:.2f} GB/s",
                f"- the same bytes written raw with one fsync: {raw_s:.2f} s, {gb / raw_s:.2f} GB/s",
            ]
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path(os.environ.get("GPU_RESULTS", "bench/results")))
    ap.add_argument("--dry-run", action="store_true", help="on CPU, tiny sizes (what CI runs)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    ap.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="scratch space on local disk")
    ap.add_argument("--checkpoint-timing", metavar="CONFIG", help="run only the checkpoint step, on CONFIG")
    ap.add_argument("--set", action="append", default=[], help="config override for --checkpoint-timing")
    args = ap.parse_args()
    if args.checkpoint_timing:
        checkpoint_timing(args.checkpoint_timing, args.set, args.work.resolve())
        return
    sys.exit(check(args.results.resolve(), args.dry_run, args.budget, args.work.resolve()))


if __name__ == "__main__":
    main()
