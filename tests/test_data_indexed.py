"""The .bin/.idx format: round trips, byte compatibility with megatron-core, and every corrupt-file error."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from megatronlite.data.indexed import IndexedDataset, IndexedWriter, dtype_for_vocab, paths
from megatronlite.errors import UserError

DOCS = [np.array([1, 2, 3]), np.array([7]), np.arange(100, 140), np.array([5, 6])]


def write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    ds = IndexedDataset(write(tmp_path / "c", dtype=dtype))
    assert ds.num_documents == len(DOCS) == len(ds)
    assert ds.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in DOCS])
    for i, d in enumerate(DOCS):
        np.testing.assert_array_equal(ds.get(i), d)
    np.testing.assert_array_equal(ds.get(2, offset=5, length=3), [105, 106, 107])
    np.testing.assert_array_equal(ds.get(2, offset=38), [138, 139])


def test_dtype_for_vocab():
    assert dtype_for_vocab(257) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(128256) == np.int32


def test_megatron_core_reads_ours(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    ds = MegatronIndexed(write(tmp_path / "c"))
    assert len(ds) == len(DOCS)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(DOCS) + 1))
    for i, d in enumerate(DOCS):
        np.testing.assert_array_equal(ds[i], d)


def test_we_read_megatron_core_files_and_write_the_same_bytes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in DOCS:
        builder.add_item(torch.tensor(d))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(tmp_path / "m")
    for i, d in enumerate(DOCS):
        np.testing.assert_array_equal(ds.get(i), d)
    ours = write(tmp_path / "o")
    for theirs, mine in zip(paths(tmp_path / "m"), paths(ours)):
        assert theirs.read_bytes() == mine.read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedWriter(tmp_path / "c") as w:
        w.add_document(np.arange(5))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def _corrupt_idx(prefix, offset, data):
    idx = paths(prefix)[1]
    raw = bytearray(idx.read_bytes())
    raw[offset : offset + len(data)] = data
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: paths(p)[0].unlink(), r"c\.bin: not found"),
        (lambda p: paths(p)[1].unlink(), r"c\.idx: not found"),
        (lambda p: _corrupt_idx(p, 0, b"NOTMEGA"), r"c\.idx: .*bad magic"),
        (lambda p: _corrupt_idx(p, 9, struct.pack("<Q", 2)), r"c\.idx: index version 2"),
        (lambda p: paths(p)[0].write_bytes(paths(p)[0].read_bytes()[:-2]), r"c\.bin: .*truncated"),
        (lambda p: paths(p)[1].write_bytes(paths(p)[1].read_bytes()[:-8]), r"c\.idx: truncated"),
        (lambda p: _corrupt_idx(p, 17, b"\x09"), r"c\.idx: unknown dtype code 9"),
    ],
    ids=["missing-bin", "missing-idx", "magic", "version", "truncated-bin", "truncated-idx", "dtype-code"],
)
def test_corrupt_files_name_the_file(tmp_path, corrupt, message):
    prefix = write(tmp_path / "c")
    corrupt(prefix)
    with pytest.raises(UserError, match=message):
        IndexedDataset(prefix)


def test_unreadable_file_names_the_file(tmp_path, monkeypatch):
    prefix = write(tmp_path / "c")
    bin_path = paths(prefix)[0]
    bin_path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: answer as the kernel would for another user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != bin_path)
    with pytest.raises(UserError, match=r"c\.bin: not readable"):
        IndexedDataset(prefix)


def test_empty_dataset(tmp_path):
    with pytest.raises(UserError, match=r"e\.idx: the dataset has no documents"):
        IndexedDataset(write(tmp_path / "e", docs=[]))


def test_pickles_without_its_memory_maps(tmp_path):
    import pickle

    ds = IndexedDataset(write(tmp_path / "c"))
    ds.get(0)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy.get(2), DOCS[2])


# DOCS in the .idx: a 34-byte header, then 4 int32 sizes (34), 4 int64 pointers (50), 5 int64 document indices (82)
@pytest.mark.parametrize(
    "offset, data, message",
    [
        (38, struct.pack("<i", -1), r"c\.idx: sequence 1 has a negative size \(-1\)"),
        (66, struct.pack("<q", 10**12), r"c\.idx: sequence 2 starts at byte 1000000000000, expected 8"),
        (34, struct.pack("<i", 2), r"c\.idx: sequence 1 starts at byte 6, expected 4"),
        (98, struct.pack("<q", 0), r"c\.idx: document index 2 \(0\) is below the one before it \(1\)"),
        (114, struct.pack("<q", 7), r"c\.idx: document indices must run from 0 to the sequence count 4, got 0 \.\. 7"),
        (82, struct.pack("<q", -5), r"c\.idx: document indices must run from 0 .* got -5 \.\. 4"),
        (18, struct.pack("<Q", 3), r"c\.idx: 122 bytes but its header describes 110 \(3 sequences, 5 document"),
        (26, struct.pack("<Q", 2), r"c\.idx: 122 bytes but its header describes 98 \(4 sequences, 2 document"),
    ],
    ids=[
        "negative-size",
        "bogus-pointer",
        "size-pointer-mismatch",
        "docs-decrease",
        "docs-end",
        "docs-start",
        "count-short",
        "doc-count-short",
    ],
)
def test_inconsistent_index_is_refused_at_open(tmp_path, offset, data, message):
    prefix = write(tmp_path / "c")
    _corrupt_idx(prefix, offset, data)
    with pytest.raises(UserError, match=message):
        IndexedDataset(prefix)
