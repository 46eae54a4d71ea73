"""Built-in corpora that exist on every machine, so a run can train on real text with no download.

`builtin:stdlib` is the source of Python's standard library: its .py files in sorted path order, capped
at MAX_BYTES of text (env MEGATRONLITE_STDLIB_MAX_BYTES overrides) so the first build takes seconds. It is
tokenized with the run's tokenizer, an EOD after each file, into the cache directory on first use.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from megatronlite.data import cache, indexed
from megatronlite.data.preprocess import Progress, encode_documents
from megatronlite.data.tokenizers import Tokenizer
from megatronlite.errors import UserError

STDLIB = "builtin:stdlib"
MAX_BYTES = 24_000_000


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files (no site-packages), sorted, until `max_bytes` of source is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if total >= max_bytes:
            break
        if path.relative_to(root).parts[0] in ("site-packages", "dist-packages"):
            continue
        files.append(path)
        total += path.stat().st_size
    return files


def build_stdlib(prefix: str, tokenizer: Tokenizer, max_bytes: int, progress: bool = True) -> None:
    """Tokenize the capped standard library into PREFIX.bin/.idx (written atomically)."""
    dtype = indexed.dtype_for_vocab(tokenizer.vocab_size)
    meter = Progress(f"building {STDLIB}", progress)
    with indexed.IndexedWriter(prefix, dtype) as writer:
        for path in stdlib_files(max_bytes):
            text = path.read_bytes().decode("utf-8", errors="replace")
            tokens, sizes = encode_documents(tokenizer, [text], True, dtype)
            writer.add_documents(tokens, sizes)
            meter.update(1, len(tokens))
    meter.done()


def resolve_prefix(path: str, tokenizer: Tokenizer, cache_dir: str) -> str:
    """The .bin/.idx prefix for a `data.sources` path: a built-in corpus (built on first use) or a checked prefix."""
    if path == STDLIB:
        max_bytes = int(os.environ.get("MEGATRONLITE_STDLIB_MAX_BYTES", MAX_BYTES))
        digest = cache.key(tokenizer.name, sys.version, max_bytes)
        prefix = str(Path(cache_dir) / f"builtin-stdlib-{digest}")
        cache.build_once(list(indexed.paths(prefix)), lambda: build_stdlib(prefix, tokenizer, max_bytes))
        return prefix
    if path.startswith("builtin:"):
        raise UserError(f"data.sources path {path!r}: unknown built-in corpus; valid: {STDLIB}")
    for file in indexed.paths(path):
        if not file.is_file():
            raise UserError(f"data.sources path {path!r}: {file} not found; give the prefix of a .bin/.idx pair")
    return path
