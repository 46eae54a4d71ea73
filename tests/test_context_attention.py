"""Context parallelism: the sequence split helpers, and ring / all-gather attention on gloo processes
against attention on the whole sequence, forward and backward: causal, and with a sliding window
and/or document masking by true position."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn
from test_attention_mask import documents_of, reference

from megatronlite.models.attention_mask import masked_attention
from megatronlite.parallel.context import (
    _Masking,
    chunk_ids,
    context_attention,
    local_positions,
    split_sequence,
    unsplit_sequence,
)

CHUNK = 3  # tokens per chunk: odd, so an off-by-one in the chunk arithmetic shows
SHAPES = [(2, 4, 2, 8), (1, 6, 3, 4), (2, 3, 3, 8)]  # (batch, q heads, kv heads, head dim)
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)
# (window, documents): a window under a chunk, one spanning chunks (far pairs skipped), one over the
# whole sequence; documents of uneven lengths, some ending on a chunk boundary, some under a chunk
MASKS = [(2, False), (5, False), (100, False), (None, True), (2, True), (5, True)]


def test_chunk_ids():
    assert chunk_ids(0, 1) == (0, 1)
    assert [chunk_ids(r, 2) for r in range(2)] == [(0, 3), (1, 2)]
    assert [chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    with pytest.raises(ValueError, match="cp_rank"):
        chunk_ids(2, 2)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_unsplit_and_positions(cp):
    seq = 2 * cp * CHUNK
    x = torch.randn(2, seq, 5)
    parts = [split_sequence(x, 1, r, cp) for r in range(cp)]
    assert all(p.shape == (2, seq // cp, 5) for p in parts)
    assert torch.equal(unsplit_sequence(parts, 1), x)
    positions = [local_positions(seq // cp, r, cp, "cpu") for r in range(cp)]
    for r in range(cp):
        assert torch.equal(positions[r], split_sequence(torch.arange(seq), 0, r, cp))
        assert torch.equal(x[:, positions[r]], parts[r])
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(seq))


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="divisible by 2 \\* context parallel size = 4"):
        split_sequence(torch.zeros(2, 6), 1, 0, 2)
    with pytest.raises(ValueError, match="must be even"):
        local_positions(5, 0, 2)


def test_ring_skips_pairs_with_nothing_to_attend():
    """cp = 4, chunks of 3: rank 3 holds chunks 3 and 4, rank 0 chunks 0 and 7."""
    causal = _Masking.of(None, None, 4)
    assert causal.pairs(3, 0, 4, CHUNK) == [(0, 0, 3, 0, False), (1, 0, 4, 0, False)]
    assert [p.masked for p in causal.pairs(3, 3, 4, CHUNK)] == [True, False, True]  # only diagonals masked
    # positions 9..11 and 12..14 against 0..2: a 5-token window reaches back to 5 at most
    assert _Masking.of(5, None, 4).pairs(3, 0, 4, CHUNK) == []
    assert _Masking.of(8, None, 4).pairs(3, 0, 4, CHUNK) == [(0, 0, 3, 0, True)]  # 9..11 reach 2..4
    # row 0's documents: 0..2 | 3 | 4..8 | 9..10 | 11..17 | 18..23; row 1's: 0..6 | 7..23
    one_row, both_rows = documents_of(1, 8 * CHUNK), documents_of(2, 8 * CHUNK)
    assert _Masking.of(None, one_row, 4).pairs(3, 0, 4, CHUNK) == []
    assert _Masking.of(None, one_row, 4).pairs(1, 0, 4, CHUNK) == []  # 3..5 against 0..2
    assert _Masking.of(None, both_rows, 4).pairs(1, 0, 4, CHUNK) == [(0, 0, 1, 0, True)]  # row 1 shares one
    # chunk 5 (15..17) against chunks 3 (9..11, a boundary inside) and 4 (12..14, the same document)
    pairs = _Masking.of(None, one_row, 4).pairs(2, 3, 4, CHUNK)
    assert [(p.q_chunk, p.kv_chunk, p.masked) for p in pairs] == [(5, 3, True), (5, 4, False)]


def test_one_rank_is_plain_causal_attention():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for impl in ("ring", "allgather"):
        torch.testing.assert_close(context_attention(q, k, v, None, impl=impl), expected)
    with pytest.raises(ValueError, match="one of ring, allgather; got 'flash'"):
        context_attention(q, k, v, None, impl="flash")


def test_one_rank_is_masked_attention():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    documents = documents_of(2, 6)
    expected = masked_attention(q, k, v, 2, documents)
    for impl in ("ring", "allgather"):
        torch.testing.assert_close(context_attention(q, k, v, None, impl, window=2, documents=documents), expected)


def _check(group, impl, shape, dtype, tol, seed, window=None, with_docs=False):
    """This rank's output and gradients equal its split of the whole-sequence reference."""
    cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    b, hq, hkv, d = shape
    seq = 2 * cp * CHUNK
    gen = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    q, dout = (torch.randn(b, hq, seq, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, seq, d, generator=gen).to(dtype) for _ in range(2))
    documents = documents_of(b, seq) if with_docs else None
    expected = reference(q, k, v, dout, window, documents)
    local = [split_sequence(t, 2, cp_rank, cp).clone().requires_grad_() for t in (q, k, v)]
    out = context_attention(*local, group, impl=impl, window=window, documents=documents)
    out.backward(split_sequence(dout, 2, cp_rank, cp))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in local)), expected):
        assert got.dtype == dtype, (name, got.dtype)
        case = f"{impl} cp={cp} shape={shape} {dtype} window={window} documents={with_docs}: {name}"
        torch.testing.assert_close(
            got.double(), split_sequence(want, 2, cp_rank, cp), **tol, msg=lambda m, case=case: f"{case}\n{m}"
        )


def _worker(rank, world, cp):
    if cp == world:
        group = dist.group.WORLD
    else:  # interleaved groups ({0, 2}, {1, 3}): group ranks differ from global ranks
        n_groups = world // cp
        group, _ = dist.new_subgroups_by_enumeration([list(range(i, world, n_groups)) for i in range(n_groups)])
    for impl in ("ring", "allgather"):
        for seed, shape in enumerate(SHAPES):
            _check(group, impl, shape, torch.float32, FP32, seed)
        _check(group, impl, SHAPES[0], torch.bfloat16, BF16, seed=len(SHAPES))
        for seed, (shape, (window, with_docs)) in enumerate(itertools.product(SHAPES, MASKS)):
            _check(group, impl, shape, torch.float32, FP32, seed, window, with_docs)
        _check(group, impl, SHAPES[0], torch.bfloat16, BF16, 0, window=5, with_docs=True)


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 processes: ~10 s of start-up
def test_context_attention_matches_full_attention(cp):
    """Both impls, fp32 (GQA, head counts not powers of two, batch > 1) and bf16, unmasked and masked."""
    spawn(_worker, cp, cp)


@pytest.mark.slow
def test_context_attention_on_subgroups():
    """CP = 2 inside a world of 4: the ring's peers are group ranks mapped to global ranks."""
    spawn(_worker, 4, 2)
