"""BatchLoader: one global sample stream, whatever the DP size, and exact resumption."""

import itertools

import numpy as np
import pytest
import torch

from megatronlite.data.loader import BatchLoader
from megatronlite.errors import UserError

SEQ = 4


class Counting:
    """Sample i is [i, i+1, .., i+SEQ]: every batch tells which samples it holds."""

    def __init__(self, n=1000):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.arange(i, i + SEQ + 1, dtype=np.int64)


def steps(loader, n):
    return list(itertools.islice(loader, n))


def global_stream(dp_size, micro=2, global_batch=8, consumed=0, n=5, dataset=None):
    """Each step's samples across all DP ranks, in rank order: what the whole job trains on."""
    per_rank = [
        steps(BatchLoader(dataset or Counting(), micro, global_batch, r, dp_size, consumed_samples=consumed), n)
        for r in range(dp_size)
    ]
    return [torch.cat([mb for rank in per_rank for mb in rank[k]]) for k in range(n)]


def test_steps_hold_the_global_batch_in_micro_batches():
    loader = BatchLoader(Counting(), 2, 8, dp_rank=1, dp_size=2)
    first, second = steps(loader, 2)
    assert len(first) == 2 and first[0].shape == (2, SEQ + 1) and first[0].dtype == torch.int64
    assert [mb[:, 0].tolist() for mb in first] == [[4, 5], [6, 7]]
    assert [mb[:, 0].tolist() for mb in second] == [[12, 13], [14, 15]]
    assert loader.consumed_samples == 16


def test_same_global_stream_for_every_dp_size():
    reference = global_stream(1)
    assert [s[:, 0].tolist() for s in reference[:2]] == [list(range(8)), list(range(8, 16))]
    for dp in (2, 4):
        for a, b in zip(reference, global_stream(dp)):
            assert torch.equal(a, b)


def test_resume_with_another_dp_size_continues_the_stream():
    reference = global_stream(1, n=6)
    for dp in (1, 2):
        resumed = global_stream(dp, consumed=3 * 8, n=3)
        for a, b in zip(reference[3:], resumed):
            assert torch.equal(a, b)


def test_resume_matches_uninterrupted_run_on_each_rank():
    full = steps(BatchLoader(Counting(), 1, 4, 1, 2), 6)
    resumed = BatchLoader(Counting(), 1, 4, 1, 2, consumed_samples=4 * 4)
    assert resumed.consumed_samples == 16
    for a, b in zip(full[4:], steps(resumed, 2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert resumed.consumed_samples == 24


def test_wraps_past_the_end_of_the_dataset():
    [batch] = steps(BatchLoader(Counting(6), 4, 4, 0, 1, consumed_samples=4), 1)
    assert batch[0][:, 0].tolist() == [4, 5, 0, 1]


def test_dataset_errors_reach_the_training_thread():
    class Broken(Counting):
        def __getitem__(self, i):
            if i >= 8:
                raise OSError("disk gone")
            return super().__getitem__(i)

    it = iter(BatchLoader(Broken(), 2, 4, 0, 1))
    next(it), next(it)
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_bad_batch_sizes():
    with pytest.raises(UserError, match="global batch size 6 is not a multiple"):
        BatchLoader(Counting(), 2, 6, 0, 2)
    with pytest.raises(UserError, match="no samples"):
        BatchLoader(Counting(0), 2, 4, 0, 1)


def test_real_dataset_stream_is_the_same_for_dp_1_and_2(tmp_path):
    from megatronlite.data.dataset import build_datasets
    from megatronlite.data.indexed import IndexedWriter
    from megatronlite.data.tokenizers import build_tokenizer

    with IndexedWriter(tmp_path / "c") as w:
        for n in range(1, 60):
            w.add_document(np.arange(n) % 250)
    train, _ = build_datasets(
        [{"path": str(tmp_path / "c")}], build_tokenizer("byte"), SEQ, 1, "98,2", (48, 4), str(tmp_path / "cache"), 257
    )
    one, two = global_stream(1, n=6, dataset=train), global_stream(2, n=6, dataset=train)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(one[0][3], torch.from_numpy(train[3]))
