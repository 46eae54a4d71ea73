"""Raw documents from input files, streamed in input order: what preprocess and tokenizer training read.

Formats: JSON lines (.jsonl, .json, .ndjson; one object per line, the text under a key) and plain text
(.txt: the whole file is one document, so it is read at once and must fit in memory), each optionally
compressed (.gz, .zst). Globs are expanded in sorted order; other arguments are kept in the order given.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from megatronlite.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)
COMPRESSED_SUFFIXES = (".gz", ".zst")


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


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        import zstandard

        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_documents(path: Path, f: IO[str], json_key: str) -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or json_key not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno}: no key {json_key!r} (found: {keys}); choose it with --json-key")
        text = record[json_key]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, expected a string")
        yield text


def iter_documents(inputs: list[str], json_key: str = "text") -> Iterator[str]:
    """Every document of every input, in order, holding one line (or one .txt file) in memory at a time."""
    for path in expand_inputs(inputs):
        try:
            with _open_text(path) as f:
                if _format(path) == "json":
                    yield from _json_documents(path, f, json_key)
                else:
                    yield f.read()
        except (UnicodeDecodeError, EOFError, OSError) as e:
            raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input and --json-key, shared by the commands that read documents."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl/.txt files or globs")
    parser.add_argument("--json-key", default="text", help="the key holding each document's text in JSON lines")
