"""Preprocessing throughput: `preprocess --workers N` against a single-process megatron-core loop, in one run.

The baseline reads the JSON lines, tokenizes each document with the same tokenizer and writes it with
megatron-core's `IndexedDatasetBuilder`, the loop of Megatron's tools/preprocess_data.py without its pool.
Variants run interleaved, `--rounds` times, so load from other users of the machine hits all of them alike;
every output is checked to be byte-identical to the baseline's. The corpus is synthetic: documents of
Zipf-distributed pseudo-words (some non-ASCII), deterministic for a seed. The BPE tokenizer is trained on
its first megabytes with `megatronlite tokenizer train`.

Run: python bench/bench_preprocess.py [--mb 200] [--workers 2] [--rounds 2] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatronlite.data.indexed import IndexedDataset, dtype_for_vocab, paths
from megatronlite.data.preprocess import preprocess
from megatronlite.data.tokenizers import build_tokenizer


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """JSON lines of about `megabytes` MB: documents of 50..800 Zipf-distributed pseudo-words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzéüß"))
    vocab = np.array(["".join(rng.choice(letters, n)) for n in rng.integers(2, 11, 30_000)], dtype=object)
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 1_000_000:
            lengths = rng.integers(50, 800, 1000)
            words = vocab[rng.choice(len(vocab), lengths.sum(), p=weights / weights.sum())]
            for doc in np.split(words, np.cumsum(lengths)[:-1]):
                line = json.dumps({"text": " ".join(doc) + ".\n"}, ensure_ascii=False) + "\n"
                written += len(line.encode())
                f.write(line)


def megatron_loop(corpus: Path, prefix: str, spec: str) -> None:
    """The single-process baseline: parse, tokenize, append an EOD, write with IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = build_tokenizer(spec)
    bin_path, idx_path = paths(prefix)
    builder = IndexedDatasetBuilder(str(bin_path), dtype=dtype_for_vocab(tok.vocab_size).type)
    with open(corpus) as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [tok.eod_id]
            builder.add_document(ids, [len(ids)])
    builder.finalize(str(idx_path))


def pool_start_s(workers: int) -> float:
    """How long a spawned pool takes to answer its first task: each worker imports the package."""
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(abs, range(workers))
    return time.perf_counter() - start


def cpu_s() -> float:
    """CPU seconds used so far by this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_variant(name: str, corpus: Path, out: Path, spec: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one variant, pool start-up included."""
    prefix = str(out / name)
    start, cpu = time.perf_counter(), cpu_s()
    if name == "megatron":
        megatron_loop(corpus, prefix, spec)
    else:
        workers = int(name.removeprefix("workers"))
        preprocess([str(corpus)], prefix, tokenizer=spec, append_eod=True, workers=workers, progress=False)
    return time.perf_counter() - start, cpu_s() - cpu


def train_bpe(corpus: Path, workdir: Path, vocab_size: int) -> str:
    """A byte-level BPE trained by our CLI on the corpus' first 5000 documents (reused if already there)."""
    out = workdir / "bpe"
    if out.exists():
        return str(out)
    sample = workdir / "bpe-sample.jsonl"
    with open(corpus, "rb") as src, open(sample, "wb") as dst:
        dst.writelines(line for _, line in zip(range(5000), src))
    cmd = f"{sys.executable} -m megatronlite tokenizer train --input {sample} --vocab-size {vocab_size} --output {out}"
    subprocess.run(cmd.split(), check=True)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokenizers", default="bpe,byte", help="comma-separated: bpe, byte")
    parser.add_argument("--vocab-size", type=int, default=16_000, help="of the trained BPE")
    parser.add_argument("--workdir", help="keeps the corpus and tokenizer between runs (default: a temporary dir)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    # imported before any timing, and here rather than at the top, which spawned pool workers re-run
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / f"corpus-{args.mb}mb.jsonl"
    if not corpus.exists():
        make_corpus(corpus, args.mb)
    specs = {"byte": "byte"}
    if "bpe" in args.tokenizers:
        specs["bpe"] = train_bpe(corpus, workdir, args.vocab_size)
    variants = ["megatron", "workers1", f"workers{args.workers}"]
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg(),
        "corpus_bytes": corpus.stat().st_size,
        "pool_start_s": round(pool_start_s(args.workers), 2),
        "tokenizers": {},
    }
    for name in args.tokenizers.split(","):
        spec, runs = specs[name], {v: [] for v in variants}
        out = workdir / f"out-{name}"
        for _ in range(args.rounds):
            for variant in variants:
                out.mkdir(exist_ok=True)
                wall, cpu = run_variant(variant, corpus, out, spec)
                runs[variant].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": os.getloadavg()[0]})
            reference = [p.read_bytes() for p in paths(out / "megatron")]
            for variant in variants[1:]:
                assert [p.read_bytes() for p in paths(out / variant)] == reference, f"{variant} differs from megatron"
            tokens = int(IndexedDataset(out / "megatron").sizes.sum())
            shutil.rmtree(out)
        base = statistics.median(r["wall_s"] for r in runs["megatron"])
        best_base = min(r["wall_s"] for r in runs["megatron"])
        summary = {"tokens": tokens}
        for variant, rs in runs.items():
            wall = statistics.median(r["wall_s"] for r in rs)
            summary[variant] = {
                "runs": rs,
                "tokens_per_s": round(tokens / wall),
                "speedup_vs_megatron": round(base / wall, 2),
                "best_speedup_vs_megatron": round(best_base / min(r["wall_s"] for r in rs), 2),
            }
        results["tokenizers"][name] = summary
        print(json.dumps({name: summary}), flush=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
