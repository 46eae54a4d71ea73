"""The built-in stdlib corpus: built once into the cache (a small cap keeps the test fast), then reused."""

import numpy as np
import pytest

from megatronlite.data.builtin import resolve_prefix, stdlib_files
from megatronlite.data.indexed import IndexedDataset, IndexedWriter
from megatronlite.data.tokenizers import build_tokenizer
from megatronlite.errors import UserError


def test_stdlib_builds_once_with_an_eod_per_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRONLITE_STDLIB_MAX_BYTES", "200000")
    tok = build_tokenizer("byte")
    prefix = resolve_prefix("builtin:stdlib", tok, str(tmp_path))
    assert prefix.startswith(str(tmp_path / "builtin-stdlib-"))
    files = stdlib_files(200_000)
    assert files == sorted(files) and sum(f.stat().st_size for f in files) >= 200_000
    ds = IndexedDataset(prefix)
    assert ds.num_documents == len(files)
    first = ds.get(0)
    assert first[-1] == tok.eod_id and tok.decode(first[:-1]) == files[0].read_text(errors="replace")
    mtime = (tmp_path / f"{prefix}.bin").stat().st_mtime_ns
    assert resolve_prefix("builtin:stdlib", tok, str(tmp_path)) == prefix
    assert (tmp_path / f"{prefix}.bin").stat().st_mtime_ns == mtime


def test_other_paths_are_checked_and_returned_unchanged(tmp_path):
    with IndexedWriter(tmp_path / "c") as w:
        w.add_document(np.arange(3))
    assert resolve_prefix(str(tmp_path / "c"), build_tokenizer("byte"), str(tmp_path)) == str(tmp_path / "c")
    (tmp_path / "c.idx").unlink()
    with pytest.raises(UserError, match=r"c\.idx not found"):
        resolve_prefix(str(tmp_path / "c"), build_tokenizer("byte"), str(tmp_path))
