"""Our train / valid / test samples equal megatron-core's, sample for sample, built in this process.

megatron-core 0.16's BlendedMegatronDatasetBuilder(GPTDataset, ...) and our build_datasets read the same
.bin/.idx prefixes with the same blend weights, split, seed, sequence length and sample counts; every
sample's seq_len+1 tokens (megatron-core's `tokens` plus the last of its `labels`) and the index arrays
behind them must be equal. The sample counts are chosen from the corpus to land in each regime: one
epoch, several epochs with the final one shuffled apart (under 80% of it used) and with it shuffled in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from megatronlite.data.blending import BlendedDataset
from megatronlite.data.dataset import (
    FINAL_EPOCH_THRESHOLD,
    GPTDataset,
    build_datasets,
    samples_in,
    split_bounds,
)
from megatronlite.data.indexed import paths, write_index
from megatronlite.data.tokenizers import build_tokenizer

VOCAB = 65_536
SEEDS = (1234, 7)


@dataclass
class StandInTokenizer:
    """What megatron-core's GPTDataset reads from a tokenizer; eod and pad ids never occur in the corpora."""

    vocab_size: int = VOCAB
    eod: int = VOCAB - 2
    pad: int = VOCAB - 1
    unique_identifiers: tuple = ("stand-in", VOCAB)  # part of the hash naming its cache files


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """A one-process gloo group: megatron-core's BlendedDataset asks torch.distributed for its rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def write_corpus(prefix, num_docs: int, mean_len: int, seed: int) -> str:
    """`num_docs` documents of 0 to 2*mean_len-1 random uint16 tokens (a few empty ones, as real corpora have)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 2 * mean_len, num_docs).astype(np.int32)
    bin_path, idx_path = paths(prefix)
    rng.integers(0, 60_000, int(sizes.sum()), dtype=np.uint16).tofile(bin_path)
    write_index(idx_path, np.uint16, sizes)
    return str(prefix)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Three corpora of short documents (mean 50 tokens): enough that '969,30,1' gives every split some."""
    out = tmp_path_factory.mktemp("order")
    return [write_corpus(out / f"c{k}", n, 50, k) for k, n in enumerate((5000, 2500, 3000))]


def split_tokens(prefix: str, split: str, k: int) -> int:
    """Tokens in split k of the corpus (our bounds; the comparison checks they are megatron-core's)."""
    from megatronlite.data.indexed import IndexedDataset

    data = IndexedDataset(prefix)
    weights = [float(x) for x in split.split(",")]
    lo, hi = split_bounds(weights, data.num_documents)[k : k + 2]
    return int(data.sizes[lo:hi].sum())


def samples_for(tokens: int, seq_len: int, epochs: int, fraction: float) -> int:
    """A sample count that fills epochs-1 passes over a split of `tokens` tokens and `fraction` of the next."""
    return samples_in((epochs - 1) * tokens, seq_len) + max(1, int(fraction * samples_in(tokens, seq_len)))


def expected_regime(tokens: int, seq_len: int, epochs: int, fraction: float) -> tuple[int, bool]:
    """(epochs, final epoch apart) that `samples_for` asks for: apart when under 80% of the final epoch is used."""
    per_epoch = samples_in(tokens, seq_len)
    return epochs, epochs > 1 and max(1, int(fraction * per_epoch)) < int(FINAL_EPOCH_THRESHOLD * per_epoch)


def megatron_datasets(tmp_path, prefixes, weights, split, seed, seq_len, sizes):
    """megatron-core's (train, valid, test) for the blend, as its training script builds them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(list(prefixes), None if weights is None else [float(w) for w in weights]),
        split=split,
        path_to_cache=str(tmp_path / "megatron-cache"),
        tokenizer=StandInTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, list(sizes), lambda: True, config).build()


def our_datasets(tmp_path, prefixes, weights, split, seed, seq_len, sizes):
    weights = weights or [None] * len(prefixes)
    sources = [{"path": p} if w is None else {"path": p, "weight": w} for p, w in zip(prefixes, weights)]
    return build_datasets(
        sources, build_tokenizer("byte"), seq_len, seed, split, tuple(sizes), str(tmp_path / "ours-cache"), VOCAB
    )


def their_sample(dataset, i: int) -> np.ndarray:
    """megatron-core's sample i as seq_len+1 tokens: its inputs and the last of its shifted labels."""
    item = dataset[i]
    return np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()])


def assert_same_indices(ours: GPTDataset, theirs) -> None:
    np.testing.assert_array_equal(ours.doc_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)


def assert_same_samples(ours, theirs) -> None:
    """Same length, same index arrays, and every sample's tokens equal."""
    assert theirs is not None and len(ours) == len(theirs) > 0
    if isinstance(ours, BlendedDataset):
        np.testing.assert_array_equal(ours.source, theirs.dataset_index)
        np.testing.assert_array_equal(ours.sample, theirs.dataset_sample_index)
        assert len(ours.datasets) == len(theirs.datasets)
        for part, their_part in zip(ours.datasets, theirs.datasets):
            assert_same_indices(part, their_part)
    else:
        assert_same_indices(ours, theirs)
    np.testing.assert_array_equal(
        np.stack([ours[i] for i in range(len(ours))]), np.stack([their_sample(theirs, i) for i in range(len(theirs))])
    )


def regimes(dataset) -> set[tuple[int, bool]]:
    """(epochs, final epoch shuffled apart) of each GPTDataset behind a split."""
    parts = dataset.datasets if isinstance(dataset, BlendedDataset) else [dataset]
    return {(p.num_epochs, p.separate_final_epoch) for p in parts}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "plan",  # (epochs, fraction of the final epoch) for train, valid, test
    [((3, 0.3), (3, 0.9), (1, 0.5)), ((3, 0.9), (1, 0.5), (4, 0.4)), ((1, 0.7), (5, 0.1), (2, 0.95))],
    ids=["train-apart,valid-in,test-one", "train-in,valid-one,test-apart", "train-one,valid-apart,test-in"],
)
def test_one_source_matches_megatron(tmp_path, gloo, short_docs, seed, plan):
    prefix, split, seq_len = short_docs[0], "969,30,1", 63
    tokens = [split_tokens(prefix, split, k) for k in range(3)]
    sizes = [samples_for(t, seq_len, *p) for t, p in zip(tokens, plan)]
    ours = our_datasets(tmp_path, [prefix], None, split, seed, seq_len, sizes)
    theirs = megatron_datasets(tmp_path, [prefix], None, split, seed, seq_len, sizes)
    assert [regimes(d) for d in ours] == [{expected_regime(t, seq_len, *p)} for t, p in zip(tokens, plan)]
    for k in range(3):
        assert_same_samples(ours[k], theirs[k])


@pytest.mark.parametrize("below", [0, 1], ids=["at-threshold", "one-below"])
def test_final_epoch_threshold_boundary_matches_megatron(tmp_path, gloo, short_docs, below):
    """The last epoch is shuffled apart only below int(0.8 * samples per epoch) of its samples."""
    prefix, split, seq_len, seed = short_docs[1], "98,2", 63, 1234
    tokens = split_tokens(prefix, split, 0)
    from_final = int(FINAL_EPOCH_THRESHOLD * samples_in(tokens, seq_len)) - below
    sizes = [samples_in(tokens, seq_len) + from_final, 3, None]
    train, valid = our_datasets(tmp_path, [prefix], None, split, seed, seq_len, sizes[:2])
    theirs = megatron_datasets(tmp_path, [prefix], None, split, seed, seq_len, sizes)
    assert regimes(train) == {(2, bool(below))}
    assert theirs[2] is None  # "98,2" has no test split
    assert_same_samples(train, theirs[0])
    assert_same_samples(valid, theirs[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "weights",
    # the second: megatron-core normalises the weights twice, and here that moves the greedy interleave
    [[5.0, 2.5, 1.0], [0.1, 0.2, 0.3]],
    ids=["5,2.5,1", "0.1,0.2,0.3"],
)
def test_blend_of_three_matches_megatron(tmp_path, gloo, short_docs, seed, weights):
    """Uneven weights, each source's split built with megatron-core's surplus, in several epochs."""
    split, seq_len = "969,30,1", 63
    sizes = [12_000, 300, 20]
    ours = our_datasets(tmp_path, short_docs, weights, split, seed, seq_len, sizes)
    theirs = megatron_datasets(tmp_path, short_docs, weights, split, seed, seq_len, sizes)
    assert {(e > 1, apart) for e, apart in regimes(ours[0]) | regimes(ours[1]) | regimes(ours[2])} == {
        (False, False),
        (True, False),
        (True, True),
    }
    for k in range(3):
        assert len(ours[k]) >= sizes[k]
        assert_same_samples(ours[k], theirs[k])


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
    """About 4M tokens in 4,000 documents (mean 1,000 tokens): enough for samples of 2,049 tokens in every split."""
    return write_corpus(tmp_path_factory.mktemp("long") / "c", 4000, 1000, 9)


@pytest.mark.parametrize("seed", SEEDS)
def test_seq_len_2048_matches_megatron(tmp_path, gloo, long_docs, seed):
    split, seq_len, plan = "90,8,2", 2048, ((2, 0.6), (3, 0.9), (4, 0.2))
    tokens = [split_tokens(long_docs, split, k) for k in range(3)]
    sizes = [samples_for(t, seq_len, *p) for t, p in zip(tokens, plan)]
    ours = our_datasets(tmp_path, [long_docs], None, split, seed, seq_len, sizes)
    theirs = megatron_datasets(tmp_path, [long_docs], None, split, seed, seq_len, sizes)
    assert [regimes(d) for d in ours] == [{(2, True)}, {(3, False)}, {(4, True)}]
    for k in range(3):
        assert_same_samples(ours[k], theirs[k])


@pytest.mark.parametrize("split", ["98,2", "969,30,1", "949,50,1", "1,1,1", "7,2,1", "3,0,1", "2,1"])
def test_split_bounds_match_megatron(split):
    """Our document boundaries are megatron-core's split matrix times the document count, rounded as it does."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    weights = [float(x) for x in split.split(",")]
    for n in [*range(1, 400), 1001, 2500, 4000, 123_457, 1_176_541]:
        bounds = split_bounds(weights, n)
        for k, share in enumerate(matrix):
            if share is None:
                assert bounds[k] == bounds[k + 1], (split, n, k)
            else:
                assert bounds[k : k + 2] == [int(round(x * float(n))) for x in share], (split, n, k)


@pytest.mark.parametrize("dp", [1, 2])
def test_a_resumed_loader_reads_megatrons_next_samples(tmp_path, gloo, short_docs, dp):
    """After `consumed` samples (a Megatron checkpoint's consumed_train_samples), the next global batch the
    loader gives, over every DP rank, is megatron-core's samples consumed .. consumed + global batch - 1."""
    from megatronlite.data.loader import BatchLoader

    blend = dict(prefixes=short_docs, weights=[5.0, 2.5, 1.0], split="969,30,1", seed=1234, seq_len=63)
    sizes = (600, 20, 10)
    ours = our_datasets(tmp_path, **blend, sizes=sizes)[0]
    theirs = megatron_datasets(tmp_path, **blend, sizes=sizes)[0]
    consumed, micro, batch = 104, 4, 8
    got = []
    for rank in range(dp):
        batches = iter(BatchLoader(ours, micro, batch, rank, dp, consumed))
        got += [row.numpy() for micro_batch in next(batches) for row in micro_batch]
        batches.close()
    want = [their_sample(theirs, i) for i in range(consumed, consumed + batch)]
    assert len(got) == batch  # the ranks' shares make up the global batch, each sample once
    np.testing.assert_array_equal(np.stack(sorted(got, key=bytes)), np.stack(sorted(want, key=bytes)))
