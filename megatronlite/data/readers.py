"""Raw documents from input files, in input order, cut into chunks that workers read and parse on their own.

Formats: JSON lines (.jsonl, .json, .ndjson; one object per line, the text under a key) and plain text
(.txt: the whole file is one document, so it is read at once and must fit in memory), each optionally
compressed (.gz, .zst). Globs are expanded in sorted order; other arguments are kept in the order given.

Chunks make reading scale with preprocessing workers: an uncompressed JSON-lines file is cut into byte
ranges at line ends (the planner reads only a line per cut; each worker reads its own range); a compressed
one cannot be cut without decompressing it, so the planner decompresses it and hands out blocks of whole
lines; a text file is one chunk. Chunks are planned lazily, so memory stays bounded whatever the input size.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from megatronlite.errors import UserError
from megatronlite.extras import require

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
CHUNK_BYTES = 1 << 21  # large enough to amortize sending a chunk to a worker, small enough to balance the tail


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by `inputs` (paths or globs), checked to exist and to have a known format."""
    files: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"--input {item!r}: the pattern matches no files")
            files.extend(Path(m) for m in matches)
        elif not Path(item).is_file():
            raise UserError(f"--input {item}: file not found")
        else:
            files.append(Path(item))
    for path in files:
        _format(path)
    return files


def _format(path: Path) -> str:
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED_SUFFIXES else path.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    if kind in JSON_SUFFIXES:
        return "json"
    if kind in TEXT_SUFFIXES:
        return "text"
    valid = ", ".join(JSON_SUFFIXES + TEXT_SUFFIXES)
    raise UserError(f"{path}: unknown input format; valid: {valid}, each optionally compressed (.gz, .zst)")


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        return require("zstandard", "data", f"reading {path.name} (.zst)").open(path, "rb")
    return open(path, "rb")


def _unreadable(path: Path, e: Exception) -> UserError:
    if isinstance(e, UserError):  # a missing extra (zstandard) says so itself
        return e
    return UserError(f"{path}: unreadable ({e}); expected UTF-8 text, optionally compressed (.gz, .zst)")


@dataclass(frozen=True)
class Chunk:
    """Part of one input: a byte range [start, end) of an uncompressed file, decompressed lines (`data`), or,
    for a text file, the whole file. `first_line` numbers its first line when known (0: counted on error)."""

    path: Path
    start: int = 0
    end: int = 0
    data: bytes | None = None
    first_line: int = 0

    def documents(self, json_key: str) -> list[str]:
        """The chunk's documents, read and parsed in whichever process holds it."""
        if _format(self.path) == "text":
            return [self._read_text()]
        raw = self.data if self.data is not None else self._read_range()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = self._where(raw.count(b"\n", 0, e.start))
            raise UserError(f"{where}: not UTF-8 text ({e.reason})") from None
        # only "\n" ends a JSON line: str.splitlines would also cut at characters valid inside JSON strings
        return [self._parse(line, i, json_key) for i, line in enumerate(text.split("\n")) if line.strip()]

    def _read_text(self) -> str:
        try:
            with _open_binary(self.path) as f:
                raw = f.read()
        except Exception as e:  # gzip raises OSError/EOFError, zstandard its own ZstdError
            raise _unreadable(self.path, e) from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _unreadable(self.path, e) from None

    def _read_range(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                return f.read(self.end - self.start)
        except OSError as e:
            raise _unreadable(self.path, e) from None

    def _where(self, lines_into_chunk: int) -> str:
        """PATH:LINE of the chunk's line `lines_into_chunk` (0-based), for an error message."""
        if self.first_line:
            return f"{self.path}:{self.first_line + lines_into_chunk}"
        line, remaining = 1 + lines_into_chunk, self.start
        with open(self.path, "rb") as f:
            while remaining and (block := f.read(min(remaining, CHUNK_BYTES))):
                line += block.count(b"\n")
                remaining -= len(block)
        return f"{self.path}:{line}"

    def _parse(self, line: str, i: int, json_key: str) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{self._where(i)}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or json_key not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{self._where(i)}: no key {json_key!r} (found: {keys}); choose it with --json-key")
        text = record[json_key]
        if not isinstance(text, str):
            raise UserError(f"{self._where(i)}: {json_key!r} is {type(text).__name__}, expected a string")
        return text


def _ranges(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Byte ranges of about `chunk_bytes` ending at line ends; only the line at each cut is read here."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()
            end = f.tell()
            yield Chunk(path, start, end)
            start = end


def _decompressed_blocks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Blocks of about `chunk_bytes` of whole decompressed lines, numbered as they stream by."""
    line, carry = 1, b""
    try:
        with _open_binary(path) as f:
            while block := f.read(chunk_bytes):
                buf = carry + block
                cut = buf.rfind(b"\n") + 1
                if cut:
                    yield Chunk(path, data=buf[:cut], first_line=line)
                    line += buf.count(b"\n", 0, cut)
                carry = buf[cut:]
    except Exception as e:  # gzip raises OSError/EOFError, zstandard its own ZstdError
        raise _unreadable(path, e) from None
    if carry:
        yield Chunk(path, data=carry, first_line=line)


def plan_chunks(files: list[Path]) -> Iterator[Chunk]:
    """Every input's chunks, in input order, of about CHUNK_BYTES each."""
    for path in files:
        if _format(path) == "text":
            yield Chunk(path)
        elif path.suffix in COMPRESSED_SUFFIXES:
            yield from _decompressed_blocks(path, CHUNK_BYTES)
        else:
            yield from _ranges(path, CHUNK_BYTES)


def iter_documents(inputs: list[str], json_key: str = "text") -> Iterator[str]:
    """Every document of every input, in order, holding one chunk in memory at a time."""
    for chunk in plan_chunks(expand_inputs(inputs)):
        yield from chunk.documents(json_key)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input and --json-key, shared by the commands that read documents."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl/.txt files or globs")
    parser.add_argument("--json-key", default="text", help="the key holding each document's text in JSON lines")
