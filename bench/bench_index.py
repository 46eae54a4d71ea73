"""Sample-index build and start-up: our build_datasets against megatron-core's GPTDataset, same corpus, in one run.

A synthetic corpus of `--tokens` uint16 tokens (random ids, log-normal document lengths of mean about 850)
is written with np.memmap plus our index writer, then, interleaved `--rounds` times (the side that goes
first alternates), each side builds the train and valid indices (document, sample, shuffle) for the same
seq_len, seed, 98/2 split and sample counts into a fresh cache (cold), then opens them again (warm).
Megatron-core's builder runs on CPU without torch.distributed, with a stand-in tokenizer (it only reads
vocab_size, eod and pad). Afterwards, untimed, both sides' train and valid index arrays are compared
(`same_order_as_megatron`). Our token-id validation scan (the largest id in the .bin, cached by file
identity) is timed apart: with the .bin evicted from the page cache (posix_fadvise, this file only), with
it cached, and from its cached result.

Run: python bench/bench_index.py [--tokens 1e9] [--seq-len 1024] [--train-samples 2000000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatronlite.data.dataset import build_datasets, max_token_id
from megatronlite.data.indexed import IndexedDataset, paths, write_index
from megatronlite.data.tokenizers import build_tokenizer

VOCAB = 50_257


@dataclass
class StandInTokenizer:
    """What megatron-core's GPTDataset reads from its tokenizer."""

    vocab_size: int = VOCAB
    eod: int = VOCAB - 1
    pad: int = VOCAB - 2
    unique_identifiers: tuple = ("stand-in", VOCAB)  # part of the hash naming its cache files


def make_corpus(prefix: str, tokens: int, seed: int = 0) -> None:
    """`tokens` random uint16 ids in documents of log-normal length (mean about 850), fsync'd to disk."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(6.5, 0.7, tokens // 500), 1, None).astype(np.int32)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes, dtype=np.int64), tokens)]
    bin_path, idx_path = paths(prefix)
    data = np.memmap(bin_path, dtype=np.uint16, mode="w+", shape=(int(sizes.sum(dtype=np.int64)),))
    block = rng.integers(0, VOCAB, 1 << 24, dtype=np.uint16)
    for start in range(0, len(data), len(block)):
        piece = data[start : start + len(block)]
        piece[:] = block[: len(piece)]
    data.flush()
    del data
    write_index(idx_path, np.uint16, sizes)
    with open(bin_path, "rb+") as f:
        os.fsync(f.fileno())


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache, so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def ours(prefix: str, cache: str, args: argparse.Namespace) -> tuple:
    return build_datasets(
        [{"path": prefix}], build_tokenizer("byte"), args.seq_len, args.seed, "98,2",
        (args.train_samples, args.valid_samples), cache, VOCAB,
    )  # fmt: skip


def megatron(prefix: str, cache: str, args: argparse.Namespace) -> list:
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_len,
        blend=([prefix], None),
        split="98,2,0",
        path_to_cache=cache,
        tokenizer=StandInTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    sizes = [args.train_samples, args.valid_samples, None]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def same_order(prefix: str, workdir: Path, args: argparse.Namespace) -> bool:
    """Whether both sides' train and valid document, sample and shuffle indices are equal, array for array."""
    mine, theirs = ours(prefix, str(workdir / "check-ours"), args), megatron(prefix, str(workdir / "check-mc"), args)
    return all(
        np.array_equal(getattr(a, ours_name), getattr(b, their_name))
        for a, b in zip(mine, theirs[:2])
        for ours_name, their_name in (
            ("doc_index", "document_index"), ("sample_index", "sample_index"), ("shuffle_index", "shuffle_index")
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--train-samples", type=int, default=2_000_000)
    parser.add_argument("--valid-samples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", help="where the corpus goes (default: a temporary directory, removed after)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir))
    try:
        prefix = str(workdir / "corpus")
        corpus_s = timed(make_corpus, prefix, int(args.tokens))
        data = IndexedDataset(prefix)
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_before": os.getloadavg(),
            "tokens": int(data.sizes.sum(dtype=np.int64)),
            "documents": data.num_documents,
            "bin_bytes": data.bin_path.stat().st_size,
            "corpus_write_s": round(corpus_s, 1),
            "params": {k: getattr(args, k) for k in ("seq_len", "train_samples", "valid_samples", "seed")},
        }
        scan = {"evicted": [], "page_cached": [], "cached_result": []}
        runs = {f"{side}_{kind}": [] for side in ("ours", "megatron") for kind in ("cold", "warm")}
        cpus = {"ours": [], "megatron": []}  # CPU seconds of the cold builds: less swayed by other tenants
        for r in range(args.rounds):
            scan_cache = str(workdir / f"scan{r}")
            evict(data.bin_path)
            scan["evicted"].append(timed(max_token_id, data, scan_cache))
            shutil.rmtree(scan_cache)
            scan["page_cached"].append(timed(max_token_id, data, scan_cache))
            scan["cached_result"].append(timed(max_token_id, data, scan_cache))
            sides = [("ours", ours), ("megatron", megatron)]
            for side, fn in sides if r % 2 == 0 else sides[::-1]:  # neither side always runs first
                cache = str(workdir / f"{side}{r}")
                if side == "ours":  # the validation scan is measured above; here only the indices
                    shutil.copytree(scan_cache, cache)
                cpu = time.process_time()
                runs[f"{side}_cold"].append(timed(fn, prefix, cache, args))
                cpus[side].append(time.process_time() - cpu)
                runs[f"{side}_warm"].append(timed(fn, prefix, cache, args))
                shutil.rmtree(cache)
            shutil.rmtree(scan_cache)
        results["scan_s"] = {k: [round(t, 3) for t in v] for k, v in scan.items()}
        results["build_s"] = {k: [round(t, 3) for t in v] for k, v in runs.items()}
        results["median_s"] = {k: round(statistics.median(v), 3) for k, v in runs.items()}
        results["cold_cpu_s"] = {k: [round(t, 3) for t in v] for k, v in cpus.items()}
        results["median_cold_cpu_s"] = {k: round(statistics.median(v), 3) for k, v in cpus.items()}
        results["load_after"] = os.getloadavg()
        results["same_order_as_megatron"] = same_order(prefix, workdir, args)  # after the timings: untimed
    finally:
        shutil.rmtree(workdir)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
