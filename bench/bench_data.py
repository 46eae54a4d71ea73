"""Data pipeline speed: the builtin:stdlib first build, sample-index build, and loader throughput.

Run: python bench/bench_data.py [--tokenizer byte|PATH] [--seq-len 1024] [--out bench/results/data.json]
Everything happens in a fresh temporary cache, so each number includes the one-off build it measures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time

from megatronlite.data.builtin import resolve_prefix
from megatronlite.data.dataset import build_datasets
from megatronlite.data.indexed import IndexedDataset
from megatronlite.data.loader import BatchLoader
from megatronlite.data.tokenizers import build_tokenizer


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=200_000, help="train samples to index")
    parser.add_argument("--steps", type=int, default=50, help="loader steps of 8 x 4 samples")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    tok = build_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        prefix, build_s = timed(lambda: resolve_prefix("builtin:stdlib", tok, cache))
        data = IndexedDataset(prefix)
        (train, _), index_s = timed(
            lambda: build_datasets(
                [{"path": prefix}], tok, args.seq_len, 1, "98,2", (args.samples, 0), cache, tok.vocab_size
            )
        )
        loader = BatchLoader(train, micro_batch_size=8, global_batch_size=32, dp_rank=0, dp_size=1)
        _, load_s = timed(lambda: list(itertools.islice(loader, args.steps)))
    results = {
        "machine": platform.processor() or platform.machine(),
        "tokenizer": tok.name,
        "stdlib_documents": data.num_documents,
        "stdlib_tokens": int(data.sizes.sum()),
        "stdlib_build_s": round(build_s, 2),
        "stdlib_build_tokens_per_s": round(int(data.sizes.sum()) / build_s),
        "index_samples": len(train),
        "index_build_s": round(index_s, 2),
        "loader_samples_per_s": round(args.steps * 32 / load_s),
        "loader_tokens_per_s": round(args.steps * 32 * args.seq_len / load_s),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
