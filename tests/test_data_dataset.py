"""GPT samples: seq_len+1 tokens overlapping by one, megatron-core's sample index, blending, caching, errors."""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from filelock import FileLock

from megatronlite.data import cache
from megatronlite.data.blending import BlendedDataset, normalize, source_sizes
from megatronlite.data.dataset import build_datasets, sample_index, split_bounds
from megatronlite.data.indexed import IndexedDataset, IndexedWriter
from megatronlite.data.tokenizers import build_tokenizer
from megatronlite.errors import UserError

SEQ = 8


def corpus(path, num_docs=40, base=0, seed=0):
    """Documents of random lengths whose tokens are base + (running token number mod 100)."""
    rng = np.random.default_rng(seed)
    with IndexedWriter(path) as w:
        start = 0
        for n in rng.integers(1, 20, num_docs):
            w.add_document(base + (np.arange(start, start + n) % 100))
            start += n
    return str(path)


def build(tmp_path, sources, num_samples=(50, 5), split="90,10", seed=7, vocab=257):
    return build_datasets(
        sources, build_tokenizer("byte"), SEQ, seed, split, num_samples, str(tmp_path / "cache"), vocab
    )


def stream(ds):
    """The dataset's documents concatenated in document-index order."""
    return np.concatenate([ds.indexed.get(d) for d in ds.doc_index]).astype(np.int64)


def test_samples_cover_the_stream_overlapping_by_one_token(tmp_path):
    train, valid = build(tmp_path, [{"path": corpus(tmp_path / "c")}], num_samples=(200, 5))
    assert len(train) >= 200 and len(valid) >= 5
    for ds in (train, valid):
        tokens = stream(ds)
        for i in range(len(ds)):
            s = int(ds.shuffle_index[i])
            assert ds[i].dtype == np.int64
            np.testing.assert_array_equal(ds[i], tokens[s * SEQ : s * SEQ + SEQ + 1])
    assert train.doc_index.min() >= 0 and train.doc_index.max() < 36 <= valid.doc_index.min()


@pytest.mark.parametrize("fraction, apart", [(0.3, True), (0.9, False)])
def test_every_document_once_per_epoch_and_the_final_epoch_apart_when_little_used(tmp_path, fraction, apart):
    """Epochs 1..E-1 are one shuffled pool; the final epoch joins it only when at least 80% of it is used."""
    prefix = corpus(tmp_path / "c")
    tokens_per_epoch = int(IndexedDataset(prefix).sizes[:36].sum())  # 36 train documents
    per_epoch = (tokens_per_epoch - 1) // SEQ
    wanted = (3 * tokens_per_epoch - 1) // SEQ + int(fraction * per_epoch)  # 3 epochs and part of a 4th
    train, _ = build(tmp_path, [{"path": prefix}], num_samples=(wanted, 5))
    assert (train.num_epochs, train.separate_final_epoch) == (4, apart)
    docs = np.asarray(train.doc_index)
    assert (np.bincount(docs, minlength=36) == 4).all()
    assert (sorted(docs[108:]) == np.arange(36)).all() == apart  # the final epoch by itself
    assert not (sorted(docs[:36]) == np.arange(36)).all()  # epochs shuffled together, not one by one
    first_pool = (3 * tokens_per_epoch - 1) // SEQ  # the samples wholly inside epochs 1..3
    shuffle = np.asarray(train.shuffle_index)
    assert (sorted(shuffle[:first_pool]) == np.arange(first_pool)).all() == apart
    assert sorted(shuffle) == list(range(len(train)))


def test_sample_index_matches_megatron_core(tmp_path):
    from megatron.core.datasets.helpers import build_sample_idx

    sizes = IndexedDataset(corpus(tmp_path / "c")).sizes
    docs = np.concatenate([np.random.default_rng(e).permutation(40) for e in range(3)]).astype(np.int32)
    tokens_per_epoch = int(sizes.sum())
    theirs = build_sample_idx(sizes, docs, SEQ, 3, tokens_per_epoch, True, True)
    ours = sample_index(sizes, docs, SEQ, 3, tokens_per_epoch)
    np.testing.assert_array_equal(ours, theirs)


def test_deterministic_cached_and_seeded(tmp_path):
    sources = [{"path": corpus(tmp_path / "c")}]
    a, _ = build(tmp_path, sources)
    files = sorted((tmp_path / "cache").glob("gpt-*.npy"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    b, _ = build(tmp_path, sources)
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").glob("gpt-*.npy"))] == mtimes
    np.testing.assert_array_equal(np.stack([a[i] for i in range(len(a))]), np.stack([b[i] for i in range(len(b))]))
    c, _ = build(tmp_path, sources, seed=8)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    # a count with the same epochs and the same final-epoch rule has the same order: the same cache files
    more, _ = build(tmp_path, sources, num_samples=(51, 5))
    assert (more.num_epochs, more.separate_final_epoch) == (a.num_epochs, a.separate_final_epoch)
    assert more.cache_files == a.cache_files and not more.built
    fewer, _ = build(tmp_path, sources, num_samples=(10, 5))  # one epoch: another order
    assert fewer.num_epochs == 1 < a.num_epochs and fewer.built


def test_blending_follows_the_weights_deterministically(tmp_path):
    low, high = corpus(tmp_path / "low", base=0), corpus(tmp_path / "high", base=100, seed=1)
    sources = [{"path": low, "weight": 3}, {"path": high, "weight": 1.0}]
    train, valid = build(tmp_path, sources, num_samples=(400, 8))
    assert (len(train), len(valid)) == (400, 8)
    from_high = np.array([train[i].min() >= 100 for i in range(len(train))])
    from_low = np.array([train[i].max() < 100 for i in range(len(train))])
    assert (from_high ^ from_low).all()  # every sample comes whole from one source
    counts = np.cumsum(from_high)
    n = np.arange(1, len(train) + 1)
    assert np.abs(counts - n / 4).max() <= 1.0  # every prefix follows the 3:1 weights
    np.testing.assert_array_equal(from_high, train.source == 1)
    again, _ = build(tmp_path, sources, num_samples=(400, 8))
    for i in (0, 1, 2, 3, 199, 399):
        np.testing.assert_array_equal(train[i], again[i])
        np.testing.assert_array_equal(train[i], train.datasets[train.source[i]][train.sample[i]])


def test_blend_source_sizes_match_megatron_core():
    from megatron.core.datasets.blended_megatron_dataset_builder import _get_size_per_split_per_dataset

    weights = [3, 1, 0.5]
    sizes = [1, 400, 12345]
    theirs = _get_size_per_split_per_dataset(list(normalize(weights)), sizes, surplus=0.005)
    assert [[source_sizes(weights, size)[k] for size in sizes] for k in range(3)] == theirs


def test_a_blend_that_oversamples_a_source_is_a_user_error():
    with pytest.raises(UserError, match="the blend takes 5 samples from source 0, which has only 4"):
        BlendedDataset([np.zeros((4, 2)), np.zeros((100, 2))], [1.0, 1.0], 10)


def test_concurrent_builders_build_once_and_the_others_wait(tmp_path, monkeypatch):
    """Ranks starting together: one takes the lock and builds, the rest wait and then read its files."""
    sources = [{"path": corpus(tmp_path / "c")}]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: build(tmp_path, sources), range(4)))
    assert sum(train.built for train, _ in results) == 1 and sum(valid.built for _, valid in results) == 1
    for train, _ in results[1:]:
        np.testing.assert_array_equal(train.shuffle_index, results[0][0].shuffle_index)

    # the builder holds the lock until every caller has come to it, so the other two must wait on it
    calls, at_lock, arrived, out = [], [], threading.Condition(), tmp_path / "once.npy"

    def counted_lock(path: str) -> FileLock:
        with arrived:
            at_lock.append(path)
            arrived.notify_all()
        return FileLock(path)

    def build_after_all_arrive() -> None:
        calls.append(1)
        with arrived:
            assert arrived.wait_for(lambda: len(at_lock) == 3, timeout=60), f"{len(at_lock)} of 3 callers at the lock"
        cache.save_npy(out, np.arange(3))

    monkeypatch.setattr(cache, "FileLock", counted_lock)
    with ThreadPoolExecutor(3) as pool:
        built = sorted(pool.map(lambda _: cache.build_once([out], build_after_all_arrive), range(3)))
    assert built == [False, False, True]
    assert len(calls) == 1


def test_a_corpus_of_empty_documents_is_a_user_error(tmp_path):
    with IndexedWriter(tmp_path / "e") as w:
        for _ in range(5):
            w.add_document(np.array([], dtype=np.int64))
    with pytest.raises(UserError, match=r"e: documents 0\.\.3 are all empty"):
        build(tmp_path, [{"path": str(tmp_path / "e")}], split="80,20")


def test_split_bounds():
    assert split_bounds([98, 2], 100) == [0, 98, 100, 100]
    assert split_bounds([949, 50, 1], 1000) == [0, 949, 999, 1000]
    assert split_bounds([1, 0], 10) == [0, 10, 10, 10]
    assert split_bounds([1, 1], 5) == [0, 2, 5, 5]  # 2.5 rounds half to even, as megatron-core rounds it


def test_valid_split_may_be_empty_when_no_samples_are_asked(tmp_path):
    train, valid = build(tmp_path, [{"path": corpus(tmp_path / "c")}], split="100,0", num_samples=(10, 0))
    assert len(train) >= 10 and len(valid) == 0


@pytest.mark.parametrize(
    "sources, kwargs, message",
    [
        ([{"path": "C"}], {"vocab": 50}, r"c\.bin: token id 99 >= model.vocab_size 50"),
        ([{"path": "C"}], {"split": "100,0"}, r"gives the valid split none of the 40 documents of .*c"),
        ([{"path": "C"}], {"split": "abc"}, r"data.split 'abc'"),
        ([{"path": "C"}], {"seed": -1}, r"train.seed = -1: .* \[0, 2\*\*32\)"),
        ([{"path": "C", "weight": 0}], {}, r"data.sources\[0\].weight = 0 .*c\): must be a positive number"),
        ([{"path": "C"}, {"path": "C", "weight": -2}], {}, r"data.sources\[1\].weight = -2"),
        ([{"path": "C", "weight": "x"}], {}, r"weight = 'x'"),
        ([{"path": "C", "wieght": 1}], {}, r"'data.sources\[0\].wieght'; did you mean 'data.sources\[0\].weight'"),
        ([{"path": "MISSING"}], {}, r"missing\.bin not found"),
        ([{"path": "builtin:nope"}], {}, r"unknown built-in corpus; valid: builtin:stdlib"),
    ],
    ids=[
        "vocab",
        "empty-split",
        "bad-split",
        "bad-seed",
        "zero-weight",
        "negative-weight",
        "text-weight",
        "unknown-key",
        "missing",
        "unknown-builtin",
    ],
)
def test_bad_data_raises_user_error(tmp_path, sources, kwargs, message):
    prefix = corpus(tmp_path / "c")
    names = {"C": prefix, "MISSING": str(tmp_path / "missing")}
    sources = [{**s, "path": names.get(s["path"], s["path"])} for s in sources]
    with pytest.raises(UserError, match=message):
        build(tmp_path, sources, **kwargs)


def test_building_an_index_imports_neither_torch_nor_megatron_core(tmp_path):
    """megatron-core's compiled helpers are loaded from their file: its package (torch, 2.5 s and more) is not."""
    prefix = corpus(tmp_path / "c")
    code = (
        "import sys; from megatronlite.data.dataset import build_datasets; "
        "from megatronlite.data.tokenizers import build_tokenizer; "
        f"build_datasets([{{'path': {prefix!r}}}, {{'path': {prefix!r}, 'weight': 2}}], build_tokenizer('byte'), "
        f"8, 1, '90,10', (50, 5), {str(tmp_path / 'cache')!r}, 257); "
        "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and not out.stderr, (out.stdout, out.stderr)


def test_a_corpus_rewritten_with_the_same_sizes_and_times_gets_its_own_indices(tmp_path):
    """`cp -p`, `rsync -a` or a reproducible tar give a new corpus the old one's byte sizes and mtimes: its indices
    are built for its documents, never read from the old corpus's cache (whose samples had other lengths)."""
    from megatronlite.data.indexed import paths, write_index

    prefix = str(tmp_path / "corpus")

    def write(sizes, seed):
        bin_path, idx_path = paths(prefix)
        np.random.default_rng(seed).integers(0, 256, int(sizes.sum()), dtype=np.uint16).tofile(bin_path)
        write_index(idx_path, np.uint16, sizes)

    old = np.array([30, 5, 50, 12, 40, 7, 60, 25, 9, 33] * 10, dtype=np.int32)
    args = dict(tokenizer=build_tokenizer("byte"), seq_len=16, seed=1234, split="98,2", num_samples=(100, 8))
    write(old, 0)
    stamps = [os.stat(p).st_mtime_ns for p in paths(prefix)]
    build_datasets([{"path": prefix}], cache_dir=str(tmp_path / "cache"), vocab_size=257, **args)
    write(old[::-1].copy(), 1)  # the same count and total: the same .idx and .bin byte sizes
    for path, ns in zip(paths(prefix), stamps):
        os.utime(path, ns=(ns, ns))
    reused, _ = build_datasets([{"path": prefix}], cache_dir=str(tmp_path / "cache"), vocab_size=257, **args)
    fresh, _ = build_datasets([{"path": prefix}], cache_dir=str(tmp_path / "fresh"), vocab_size=257, **args)
    assert reused.built and all(len(reused[i]) == 17 for i in range(100))
    assert all(np.array_equal(reused[i], fresh[i]) for i in range(100))
