"""`megatronlite preprocess`: tokenize text files into Megatron .bin/.idx files.

The inputs are cut into chunks (see readers.py). With `--workers N` a process pool reads, decompresses,
parses and tokenizes whole chunks, each leaving its tokens in a file of a private spill directory next to
the output and sending back only the array of document sizes; the main process only plans chunks, takes
results in chunk order and appends each chunk's tokens to the .bin in one large write. At most 2N chunks
are in flight, so memory and spill space stay constant, and the output bytes never depend on N. Every
output is written under a temporary name and renamed when complete. With `--split-into N`, document i
goes to PREFIX_{i mod N:05d}, round-robin, which needs no document count up front.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from multiprocessing.pool import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatronlite.data.indexed import IndexedWriter, dtype_for_vocab
from megatronlite.data.readers import Chunk, add_input_arguments, expand_inputs, plan_chunks
from megatronlite.data.tokenizers import Tokenizer, build_tokenizer
from megatronlite.errors import UserError, made_dir


class _WorkerState(NamedTuple):
    tokenizer: Tokenizer
    json_key: str
    append_eod: bool
    dtype: np.dtype
    spill_dir: str  # where pool workers leave each chunk's tokens for the main process


_worker_state: _WorkerState | None = None


def encode_documents(
    tokenizer: Tokenizer, texts: Iterable[str], append_eod: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(every token of `texts` back to back, int32 size of each document), an EOD ending each when asked. A text of
    no tokens is no document, as in Megatron-LM's preprocess_data.py (no sequence, no lone EOD), so the same
    input gives Megatron's sequences, and its splits and sample order."""
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    parts, sizes = [], []
    for text in texts:
        ids = tokenizer.encode_array(text, dtype)
        if not len(ids):
            continue
        parts.append(ids)
        sizes.append(len(ids) + int(append_eod))
        if append_eod:
            parts.append(eod)
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype)
    return tokens, np.array(sizes, dtype=np.int32)


def _init_worker(spec: str, json_key: str, append_eod: bool, dtype: np.dtype, spill_dir: str) -> None:
    global _worker_state
    _worker_state = _WorkerState(build_tokenizer(spec), json_key, append_eod, dtype, spill_dir)


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    state = _worker_state
    return encode_documents(state.tokenizer, chunk.documents(state.json_key), state.append_eod, state.dtype)


def _encode_chunk_to_file(item: tuple[int, Chunk]) -> tuple[str, np.ndarray]:
    """In a pool worker: chunk `number`'s tokens go to a file; only its path and the sizes travel back.

    Sending the tokens through the pool's pipe costs the main process several copies and a pipe read per
    64 KiB; reading a file that is still in the page cache is one copy, so the main process stays idle.
    """
    number, chunk = item
    tokens, sizes = _encode_chunk(chunk)
    path = os.path.join(_worker_state.spill_dir, f"{number}.tokens")
    tokens.tofile(path)
    return path, sizes


def _read_spilled(path: str, sizes: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.fromfile(path, dtype=dtype)
    os.unlink(path)
    return tokens, sizes


def ordered_imap(pool: Pool, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
    """fn(item) for every item, computed by `pool`, yielded in input order with at most `in_flight` pending.

    Pool.imap would read its whole input ahead (every decompressed block in memory); this bounds it.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class Progress:
    """A one-line status on stderr (documents, tokens, tokens/s), redrawn at most once a second."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled = label, enabled
        self.docs = self.tokens = 0
        self.start = self._last = time.perf_counter()

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.enabled and time.perf_counter() - self._last >= 1.0:
            self._draw("\r")

    def done(self) -> None:
        if self.enabled:
            self._draw("\r", "\n")

    def _draw(self, head: str, tail: str = "") -> None:
        self._last = time.perf_counter()
        rate = self.tokens / max(self._last - self.start, 1e-9)
        counts = f"{self.docs:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s"
        if not sys.stderr.isatty():  # a log file gets one line per update, not carriage returns
            head, tail = "", "\n"
        sys.stderr.write(f"{head}{self.label}: {counts}{tail}")
        sys.stderr.flush()


def output_prefixes(output_prefix: str, split_into: int) -> list[str]:
    return [output_prefix] if split_into == 1 else [f"{output_prefix}_{i:05d}" for i in range(split_into)]


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str = "byte",
    json_key: str = "text",
    append_eod: bool = False,
    workers: int = 1,
    split_into: int = 1,
    progress: bool = True,
) -> list[str]:
    """Tokenize `inputs` into `split_into` .bin/.idx pairs; return their prefixes."""
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if split_into < 1:
        raise UserError(f"--split-into {split_into}: must be >= 1")
    chunks = plan_chunks(expand_inputs(inputs))  # a missing file fails here, before any work starts
    made_dir(Path(output_prefix).parent, "--output-prefix")  # and an output that cannot be written
    dtype = dtype_for_vocab(build_tokenizer(tokenizer).vocab_size)
    prefixes = output_prefixes(output_prefix, split_into)
    meter = Progress("preprocess", progress)
    with ExitStack() as stack:
        writers = [stack.enter_context(IndexedWriter(p, dtype)) for p in prefixes]
        if workers == 1:
            _init_worker(tokenizer, json_key, append_eod, dtype, "")
            encoded = map(_encode_chunk, chunks)
        else:  # the spill directory is removed after the pool stops, whatever happens
            out = Path(output_prefix)
            spill = stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{out.name}.chunks-", dir=out.parent))
            ctx = multiprocessing.get_context("spawn")  # a fork would inherit the tokenizer's threads
            init_args = (tokenizer, json_key, append_eod, dtype, spill)
            pool = stack.enter_context(ctx.Pool(workers, _init_worker, init_args))
            spilled = ordered_imap(pool, _encode_chunk_to_file, enumerate(chunks), 2 * workers)
            encoded = (_read_spilled(path, sizes, dtype) for path, sizes in spilled)
        for tokens, sizes in encoded:
            _write(writers, tokens, sizes, meter.docs)
            meter.update(len(sizes), len(tokens))
        if meter.docs < split_into:
            raise UserError(f"--input {' '.join(inputs)}: {meter.docs} documents, too few for {split_into} output(s)")
    meter.done()
    return prefixes


def _write(writers: list[IndexedWriter], tokens: np.ndarray, sizes: np.ndarray, first_doc: int) -> None:
    """Append a chunk's documents, numbered from `first_doc`, document i to writer i mod len(writers)."""
    if len(writers) == 1:
        writers[0].add_documents(tokens, sizes)
        return
    owner = (first_doc + np.arange(len(sizes))) % len(writers)
    token_owner = np.repeat(owner, sizes)
    for k, writer in enumerate(writers):
        writer.add_documents(tokens[token_owner == k], sizes[owner == k])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a path to a tokenizer.json (or its directory)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (the output does not change)")
    parser.add_argument("--split-into", type=int, default=1, help="write N outputs PREFIX_00000.. round-robin")


def main(args: argparse.Namespace) -> None:
    preprocess(
        args.input,
        args.output_prefix,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        append_eod=args.append_eod,
        workers=args.workers,
        split_into=args.split_into,
    )
