"""`megatronlite preprocess`: tokenize text files into Megatron .bin/.idx files.

Documents stream from the inputs (constant memory); with `--workers N` a process pool tokenizes chunks of
them while `imap` hands results back in input order, so the output bytes never depend on N. Every output
is written under a temporary name and renamed when complete. With `--split-into N`, document i goes to
PREFIX_{i mod N:05d}, round-robin, which needs no document count up front.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import numpy as np

from megatronlite.data.indexed import IndexedWriter, dtype_for_vocab
from megatronlite.data.readers import add_input_arguments, expand_inputs, iter_documents
from megatronlite.data.tokenizers import Tokenizer, build_tokenizer
from megatronlite.errors import UserError

CHUNK_DOCS = 64

_worker_state: tuple[Tokenizer, bool, np.dtype] | None = None


def encode_document(tokenizer: Tokenizer, text: str, append_eod: bool, dtype: np.dtype) -> np.ndarray:
    """One document's token array, with the end-of-document token appended when asked."""
    ids = tokenizer.encode(text)
    if append_eod:
        ids.append(tokenizer.eod_id)
    return np.asarray(ids, dtype=dtype)


def _init_worker(spec: str, append_eod: bool, dtype: np.dtype) -> None:
    global _worker_state
    _worker_state = (build_tokenizer(spec), append_eod, dtype)


def _encode_chunk(docs: list[str]) -> list[np.ndarray]:
    tokenizer, append_eod, dtype = _worker_state
    return [encode_document(tokenizer, text, append_eod, dtype) for text in docs]


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    expand_inputs(inputs)  # fail on a missing file before any work starts
    tok = build_tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    chunks = _chunks(iter_documents(inputs, json_key), CHUNK_DOCS)
    prefixes = output_prefixes(output_prefix, split_into)
    meter = Progress("preprocess", progress)
    with ExitStack() as stack:
        writers = [stack.enter_context(IndexedWriter(p, dtype)) for p in prefixes]
        if workers == 1:
            _init_worker(tokenizer, append_eod, dtype)
            encoded = map(_encode_chunk, chunks)
        else:
            ctx = multiprocessing.get_context("spawn")  # a fork would inherit the tokenizer's threads
            pool = stack.enter_context(ctx.Pool(workers, _init_worker, (tokenizer, append_eod, dtype)))
            encoded = pool.imap(_encode_chunk, chunks)
        for arrays in encoded:
            for array in arrays:
                writers[meter.docs % split_into].add_document(array)
                meter.update(1, len(array))
        if meter.docs < split_into:
            raise UserError(f"--input {' '.join(inputs)}: {meter.docs} documents, too few for {split_into} output(s)")
    meter.done()
    return prefixes


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
