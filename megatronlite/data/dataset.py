"""GPT training samples from .bin/.idx files, with megatron-core's GPTDataset semantics.

Per source, documents are split contiguously into train and valid by the `split` weights. For a split:
- the document index lists its documents once per epoch, each epoch in its own seeded order, for as
  many epochs as the requested samples need;
- the sample index cuts that stream into samples of seq_len+1 tokens, each starting where the previous
  one's last token is (so inputs and shifted labels cover every token), across document boundaries;
  row i is (position in the document index, offset in that document) of sample i's first token;
- the shuffle index permutes the samples within each epoch, so no document repeats before all were seen.
Every permutation is seeded by (seed, epoch), so asking for more samples keeps the order of every whole
epoch before the last one.
The three arrays are cached as .npy under a hash of all that shapes them and memory-mapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from megatronlite.data import cache
from megatronlite.data.blending import BlendedDataset, source_sizes
from megatronlite.data.builtin import resolve_prefix
from megatronlite.data.indexed import IndexedDataset
from megatronlite.data.tokenizers import Tokenizer
from megatronlite.errors import UserError, unknown_key

INDEX_VERSION = 2  # bump when the index layout or algorithms change
SPLIT_NAMES = ("train", "valid", "test")
_SCAN_TOKENS = 1 << 24


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def document_index(documents: np.ndarray, num_epochs: int, seed: int) -> np.ndarray:
    """The split's document ids, once per epoch, each epoch shuffled in place by (seed, epoch)."""
    n = len(documents)
    index = np.tile(documents.astype(np.int32), num_epochs)
    for epoch in range(num_epochs):
        np.random.default_rng([seed, epoch, 0]).shuffle(index[epoch * n : (epoch + 1) * n])
    return index


def _index_dtype(largest: int) -> type:
    """int32 whenever it holds `largest`, as megatron-core does: half the memory traffic and cache size."""
    return np.int32 if largest <= np.iinfo(np.int32).max else np.int64


def sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2]: where each sample's first token is, as (position in doc_index, offset).

    Sample k starts at token k * seq_len of the concatenated stream, in the first document that ends past
    it: its position is the number of documents ending at or before that token, counted for all samples
    at once (a histogram of the first sample index at or after each document's end, summed up) instead of
    searched for one by one. The same rows megatron-core's `build_sample_idx` gives (checked by a test).
    """
    lengths = sizes[doc_index]
    ends = np.cumsum(lengths, dtype=np.int64)
    first_sample_after = ends + (seq_len - 1)
    first_sample_after //= seq_len
    np.minimum(first_sample_after, num_samples + 1, out=first_sample_after)
    position = np.cumsum(np.bincount(first_sample_after, minlength=num_samples + 2)[: num_samples + 1])
    index = np.empty((num_samples + 1, 2), dtype=_index_dtype(len(doc_index)))  # offsets fit: sizes are int32
    index[:, 0] = position
    index[:, 1] = np.arange(num_samples + 1, dtype=np.int64) * seq_len - (ends[position] - lengths[position])
    return index


def shuffle_index(epoch_starts: Sequence[int], seed: int) -> np.ndarray:
    """A permutation of the samples that keeps each epoch's samples (bounded by `epoch_starts`) together."""
    index = np.arange(epoch_starts[-1], dtype=_index_dtype(epoch_starts[-1]))
    for epoch, (lo, hi) in enumerate(zip(epoch_starts[:-1], epoch_starts[1:])):
        np.random.default_rng([seed, epoch, 1]).shuffle(index[lo:hi])
    return index


class GPTDataset:
    """Samples of seq_len+1 tokens from documents [lo, hi) of one indexed dataset, at least `num_samples`."""

    def __init__(
        self, indexed: IndexedDataset, lo: int, hi: int, seq_len: int, num_samples: int, seed: int, cache_dir: str
    ) -> None:
        self.indexed, self.seq_len = indexed, seq_len
        sizes = indexed.sizes
        tokens_per_epoch = int(sizes[lo:hi].sum())
        if tokens_per_epoch == 0:
            raise UserError(f"{indexed.prefix}: documents {lo}..{hi - 1} are all empty; there is nothing to train on")
        # the last sample needs one token past its seq_len, hence the -1
        num_epochs = max(1, math.ceil((num_samples * seq_len + 1) / tokens_per_epoch))
        total = (num_epochs * tokens_per_epoch - 1) // seq_len
        files_id = [cache.fingerprint(indexed.idx_path), cache.fingerprint(indexed.bin_path)]
        digest = cache.key(INDEX_VERSION, files_id, lo, hi, seq_len, seed, num_epochs)
        files = {name: Path(cache_dir) / f"gpt-{digest}-{name}.npy" for name in ("doc", "sample", "shuffle")}

        def build() -> None:
            docs = document_index(np.arange(lo, hi), num_epochs, seed)
            cache.save_npy(files["doc"], docs)
            cache.save_npy(files["sample"], sample_index(sizes, docs, seq_len, total))
            epoch_starts = [min(total, -(-e * tokens_per_epoch // seq_len)) for e in range(num_epochs + 1)]
            cache.save_npy(files["shuffle"], shuffle_index(epoch_starts, seed))

        self.cache_files = list(files.values())
        self.built = cache.build_once(self.cache_files, build)  # False: found in the cache
        self.doc_index, self.sample_index, self.shuffle_index = (
            np.load(files[name], mmap_mode="r") for name in ("doc", "sample", "shuffle")
        )

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        j = int(self.shuffle_index[i])
        # Python ints: int32 index entries must not meet the int64 token offsets of a large .bin in int32
        (first, start), (last, end) = self.sample_index[j : j + 2].tolist()
        docs, get = self.doc_index, self.indexed.get
        if first == last:
            parts = [get(docs[first], start, end - start + 1)]
        else:
            parts = [get(docs[first], start)]
            parts += [get(docs[k]) for k in range(first + 1, last)]
            parts.append(get(docs[last], 0, end + 1))
        return np.concatenate(parts).astype(np.int64)


class EmptyDataset:
    """A split asked for no samples and given no documents."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> np.ndarray:
        raise IndexError(f"sample {i}: the dataset is empty")


def parse_split(split: str) -> list[float]:
    """ "98,2" (train, valid) or Megatron's "949,50,1" (the third, test, share is set aside unused)."""
    try:
        weights = [float(x) for x in str(split).split(",")]
    except ValueError:
        weights = []
    if len(weights) not in (2, 3) or min(weights) < 0 or weights[0] <= 0:
        raise UserError(f"data.split {split!r}: expected train,valid weights such as '98,2' (non-negative, train > 0)")
    return weights


def split_bounds(weights: Sequence[float], num_documents: int) -> list[int]:
    """Document boundaries [0, .., num_documents] of contiguous splits in proportion to `weights`."""
    shares = np.cumsum(weights) / sum(weights)
    return [0] + [int(round(s * num_documents)) for s in shares[:-1]] + [num_documents]


def parse_sources(sources: list) -> list[tuple[str, float]]:
    """(path, weight) for each `data.sources` entry; a weight must be a positive number (default 1)."""
    if not isinstance(sources, list) or not sources:
        raise UserError("data.sources: expected a non-empty list of {path: PREFIX, weight: W}")
    parsed = []
    for i, entry in enumerate(sources):
        for key in entry if isinstance(entry, dict) else ():
            if key not in ("path", "weight"):
                raise unknown_key(key, ("path", "weight"), f"data.sources[{i}].")
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserError(f"data.sources[{i}] = {entry!r}: expected {{path: PREFIX, weight: W}}")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise UserError(f"data.sources[{i}].weight = {weight!r} ({entry['path']}): must be a positive number")
        parsed.append((entry["path"], float(weight)))
    return parsed


def max_token_id(indexed: IndexedDataset, cache_dir: str) -> int:
    """The largest token id in the .bin, scanned in chunks through the memory map and cached by file identity."""
    path = Path(cache_dir) / f"maxid-{cache.key(cache.fingerprint(indexed.bin_path))}.txt"

    def build() -> None:
        tokens = indexed.tokens
        top = max((int(tokens[i : i + _SCAN_TOKENS].max()) for i in range(0, len(tokens), _SCAN_TOKENS)), default=-1)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(top))
        tmp.replace(path)

    cache.build_once([path], build)
    return int(path.read_text())


def _open_source(path: str, tokenizer: Tokenizer, cache_dir: str, vocab_size: int) -> IndexedDataset:
    data = IndexedDataset(resolve_prefix(path, tokenizer, cache_dir))
    top = max_token_id(data, cache_dir)
    if top >= vocab_size:
        raise UserError(
            f"{data.bin_path}: token id {top} >= model.vocab_size {vocab_size}; "
            "was it made with another tokenizer? Re-run preprocess or raise model.vocab_size"
        )
    return data


def build_datasets(
    sources: list[dict],
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    split: str,
    num_samples: tuple[int, int],
    cache_dir: str,
    vocab_size: int,
) -> tuple[Dataset, Dataset]:
    """(train, valid) datasets of `num_samples` samples each (a single source may give more), blended by weight."""
    weights = parse_split(split)
    entries = parse_sources(sources)
    opened = [(_open_source(path, tokenizer, cache_dir, vocab_size), w) for path, w in entries]
    result = []
    for k, wanted in enumerate(num_samples):
        sizes = source_sizes([w for _, w in opened], wanted) if len(opened) > 1 else [wanted]
        parts = []
        for (data, _), size in zip(opened, sizes):
            lo, hi = split_bounds(weights, data.num_documents)[k : k + 2]
            if lo == hi:
                if wanted == 0:
                    continue
                raise UserError(
                    f"data.split {split!r} gives the {SPLIT_NAMES[k]} split none of the {data.num_documents} "
                    f"documents of {data.prefix}; raise its share or use more documents"
                )
            parts.append(GPTDataset(data, lo, hi, seq_len, size, seed, cache_dir))
        if len(parts) < len(opened):
            result.append(EmptyDataset())
        elif len(parts) == 1:
            result.append(parts[0])
        else:
            result.append(BlendedDataset(parts, [w for _, w in opened], wanted))
    return result[0], result[1]
