"""Loader headroom: BatchLoader samples/s against the samples/s the demo model's training step consumes.

Both sides use the demo config (configs/demo.yaml: builtin:stdlib, byte tokenizer, seq 256, global batch 16)
with a fresh cache. The loader is timed alone for `--loader-steps` steps (its prefetch thread included,
nothing else running); the training side is `megatronlite train` for `--train-steps` steps in a subprocess,
whose per-step tokens/s (logged every step, the first step dropped as warm-up) give the samples/s the
model consumes. Rounds alternate the two, so machine load hits both alike.

Run: python bench/bench_loader.py [--rounds 2] [--train-steps 8] [--loader-steps 500] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatronlite.config import load
from megatronlite.data.loader import BatchLoader
from megatronlite.data.run import build_run_data

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def loader_samples_per_s(cfg, steps: int) -> float:
    data = build_run_data(cfg)
    t = cfg.train
    loader = BatchLoader(data.train, t.micro_batch_size, t.global_batch_size, dp_rank=0, dp_size=1)
    start = time.perf_counter()
    for _ in itertools.islice(loader, steps):
        pass
    return steps * t.global_batch_size / (time.perf_counter() - start)


def train_samples_per_s(sets: list[str], run_dir: Path, steps: int, seq_len: int) -> float:
    sets = sets + [f"train.steps={steps}", "logging.interval=1", "train.eval_interval=0", "checkpoint.save=false"]
    cmd = [sys.executable, "-m", "megatronlite", "train", CONFIG, "--run-dir", str(run_dir)]
    subprocess.run(cmd + [arg for s in sets for arg in ("--set", s)], check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_sec"] for r in records[1:]) / seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--loader-steps", type=int, default=500)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"data.cache_dir={tmp}/cache"]
        cfg = load(CONFIG, sets)
        build_run_data(cfg)  # the stdlib corpus and indices, built once before timing
        loader, train = [], []
        for r in range(args.rounds):
            loader.append(loader_samples_per_s(cfg, args.loader_steps))
            train.append(train_samples_per_s(sets, Path(tmp) / f"run{r}", args.train_steps, cfg.train.seq_len))
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load": os.getloadavg(),
        "loader_samples_per_s": [round(x) for x in loader],
        "train_samples_per_s": [round(x, 1) for x in train],
        "train_step_s": [round(cfg.train.global_batch_size / x, 3) for x in train],
        "headroom": round(statistics.median(loader) / statistics.median(train)),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
