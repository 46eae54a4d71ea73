"""Megatron's indexed token format (MMIDIDX version 1): PREFIX.bin holds the tokens, PREFIX.idx their layout.

We write and read the exact bytes megatron-core does, so corpora move freely between the two. The .idx is
a header (magic, <Q version, <B dtype code, <Q sequence count, <Q document count) then int32 sequence
sizes, int64 byte offsets into the .bin, and int64 document boundaries. Like megatron-core's GPTDataset
we treat each sequence as one document.
"""

from __future__ import annotations

import array
import os
import struct
from pathlib import Path

import numpy as np

from megatronlite.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest token dtype for a vocabulary: uint16 halves the file size whenever it fits."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx)."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_index(idx_path: str | os.PathLike, dtype: np.dtype, sizes: np.ndarray) -> None:
    """The .idx for documents of `sizes` tokens stored back to back in the .bin (one sequence per document)."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    documents = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], len(sizes), len(documents)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(documents.tobytes())


class IndexedWriter:
    """Appends documents to PREFIX.bin/.idx; the files appear under their real names only at `finalize()`.

    Tokens stream to a temporary .bin while sizes stay in memory (4 bytes a document); on `finalize()`
    the .idx is written and both are renamed, .bin first, so a run killed midway leaves no complete-looking
    output. Used as a context manager, an exception removes the temporary files instead.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise UserError(f"token dtype {self.dtype} is not one of megatron's: {', '.join(map(str, DTYPE_CODES))}")
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin, self._tmp_idx = _temp(self.bin_path), _temp(self.idx_path)
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = array.array("i")  # C int: int32 on every platform megatron runs on

    def add_document(self, tokens: np.ndarray) -> None:
        doc = np.asarray(tokens)
        if doc.ndim != 1:
            raise ValueError(f"a document is a 1-D token array, got shape {doc.shape}")
        self.add_documents(doc, np.array([len(doc)]))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Several documents at once: their tokens back to back and each one's length, written in one go."""
        sizes = np.asarray(sizes, dtype=np.int32)
        if len(tokens) != sizes.sum():
            raise ValueError(f"{len(tokens)} tokens but the sizes add up to {sizes.sum()}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype))
        self._sizes.frombytes(sizes.tobytes())

    def finalize(self) -> None:
        self._bin.close()
        write_index(self._tmp_idx, self.dtype, np.frombuffer(self._sizes, dtype=np.int32))
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """A read-only, memory-mapped view of PREFIX.bin/.idx, checked on open and opened lazily.

    The header is validated in the constructor (so bad data fails at start-up, naming the file); the
    memory maps are made on first use and dropped when pickled, so the object is cheap to send to workers.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(f"{path}: not found; expected a .bin/.idx pair written by `megatronlite preprocess`")
            if not os.access(path, os.R_OK):
                raise UserError(f"{path}: not readable by this user; check the file's permissions")
        self.dtype, self._count, self._doc_count = self._read_header()
        self._index: np.memmap | None = None
        self._bin: np.ndarray | None = None
        if self._count == 0:
            raise UserError(f"{self.idx_path}: the dataset has no documents")
        self._check_sizes_and_pointers()
        self._check_document_indices()
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise UserError(
                f"{self.bin_path}: {actual} bytes but {self.idx_path} describes {expected}; "
                "the file is truncated or from another run, re-run preprocess"
            )

    def _read_header(self) -> tuple[np.dtype, int, int]:
        with open(self.idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size or raw[: len(MAGIC)] != MAGIC:
            raise UserError(f"{self.idx_path}: not a Megatron index file (bad magic); expected {MAGIC!r}")
        _, version, code, count, doc_count = _HEADER.unpack(raw)
        if version != VERSION:
            raise UserError(f"{self.idx_path}: index version {version}; only version {VERSION} is supported")
        if code not in CODE_DTYPES:
            raise UserError(f"{self.idx_path}: unknown dtype code {code}; valid: {sorted(CODE_DTYPES)}")
        needed = _HEADER.size + count * 12 + doc_count * 8
        actual = self.idx_path.stat().st_size
        if actual < needed:
            raise UserError(f"{self.idx_path}: truncated ({actual} bytes, needs {needed})")
        if actual > needed:
            raise UserError(
                f"{self.idx_path}: {actual} bytes but its header describes {needed} "
                f"({count} sequences, {doc_count} document indices); the header is corrupt"
            )
        return CODE_DTYPES[code], count, doc_count

    def _check_sizes_and_pointers(self) -> None:
        """Sizes are non-negative and each sequence starts where the previous one ends (megatron writes them
        back to back from byte 0), so with the .bin length check every read stays inside the file."""
        sizes, pointers = self.sizes, self.pointers
        negative = np.flatnonzero(sizes < 0)
        if len(negative):
            i = int(negative[0])
            raise UserError(f"{self.idx_path}: sequence {i} has a negative size ({sizes[i]}); the index is corrupt")
        expected = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        wrong = np.flatnonzero(pointers != expected)
        if len(wrong):
            i = int(wrong[0])
            raise UserError(
                f"{self.idx_path}: sequence {i} starts at byte {pointers[i]}, expected {expected[i]} "
                "(right after the previous sequence); the index is corrupt"
            )

    def _check_document_indices(self) -> None:
        """Document boundaries run from 0 to the sequence count without going back, as megatron-core asserts."""
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != self._count:
            ends = f"{docs[0]} .. {docs[-1]}" if len(docs) else "none"
            raise UserError(
                f"{self.idx_path}: document indices must run from 0 to the sequence count {self._count}, "
                f"got {ends}; the index is corrupt"
            )
        back = np.flatnonzero(docs[1:] < docs[:-1])
        if len(back):
            j = int(back[0]) + 1
            raise UserError(
                f"{self.idx_path}: document index {j} ({docs[j]}) is below the one before it ({docs[j - 1]}); "
                "the index is corrupt"
            )

    @property
    def _idx(self) -> np.memmap:
        if self._index is None:
            self._index = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        return self._index

    @property
    def sizes(self) -> np.ndarray:
        """int32 length of every document."""
        return np.frombuffer(self._idx, dtype=np.int32, count=self._count, offset=_HEADER.size)

    @property
    def pointers(self) -> np.ndarray:
        """int64 byte offset of every document in the .bin."""
        return np.frombuffer(self._idx, dtype=np.int64, count=self._count, offset=_HEADER.size + self._count * 4)

    @property
    def document_indices(self) -> np.ndarray:
        """int64 boundaries of megatron's documents in sequences (0, ..., count); we read one per sequence."""
        offset = _HEADER.size + self._count * 12
        return np.frombuffer(self._idx, dtype=np.int64, count=self._doc_count, offset=offset)

    @property
    def num_documents(self) -> int:
        return self._count

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin, memory-mapped."""
        if self._bin is None:  # an empty file cannot be mapped: every document is empty
            empty = self.bin_path.stat().st_size == 0
            self._bin = np.empty(0, self.dtype) if empty else np.memmap(self.bin_path, mode="r", dtype=self.dtype)
        return self._bin

    def get(self, doc_id: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of document `doc_id` (to its end when length is None), a view."""
        size = int(self.sizes[doc_id])
        if length is None:
            length = size - offset
        start = int(self.pointers[doc_id]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def __len__(self) -> int:
        return self._count

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None, "_bin": None}
