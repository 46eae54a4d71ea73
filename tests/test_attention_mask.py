"""Sliding-window and document-masked attention on one rank, against attention with an explicit mask
written from the definitions, forward and backward; and the window rule against transformers'."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatronlite.models import attention_mask as am
from megatronlite.models.attention_mask import attention_mask, masked_attention

SHAPES = [(2, 4, 2, 8), (1, 6, 3, 4), (2, 3, 3, 8)]  # (batch, q heads, kv heads, head dim)
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)
SEQ = 20


def documents_of(batch: int, seq: int) -> torch.Tensor:
    """Document ids [batch, seq] of uneven lengths: row 0 cycles 3, 1, 5, 2, 7, 6 tokens (boundaries at
    3, 9 and 18, multiples of the CP tests' chunk, and one-token documents), row 1 is cut once at 7."""
    rows = []
    for lengths in ((3, 1, 5, 2, 7, 6), (7, seq)):
        ids = torch.repeat_interleave(torch.arange(len(lengths) * seq), torch.tensor(lengths).repeat(seq))
        rows.append(ids[:seq])
    return torch.stack(rows)[:batch]


def reference_mask(seq: int, window: int | None, documents: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, seq, seq], True where query i sees key j: 0 <= i - j < window, same document."""
    back = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    mask = ((back >= 0) & (back < (seq if window is None else window)))[None]
    if documents is not None:
        mask = mask & (documents[:, :, None] == documents[:, None, :])
    return mask[:, None]


def reference(q, k, v, dout, window, documents):
    """Softmax attention with the explicit mask, in fp64: (out, dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    mask = reference_mask(q.shape[2], window, documents)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(group, 1)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(shape, seq, dtype, seed):
    b, hq, hkv, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, hq, seq, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, seq, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, dout


CASES = [(3, False), (1, False), (SEQ + 5, False), (None, True), (4, True)]  # (window, documents)


@pytest.mark.parametrize(("seed", "shape", "case"), [(i, *p) for i, p in enumerate(itertools.product(SHAPES, CASES))])
def test_dense_matches_reference(seed, shape, case):
    window, with_docs = case
    q, k, v, dout = _inputs(shape, SEQ, torch.float32, seed)
    documents = documents_of(shape[0], SEQ) if with_docs else None
    expected = reference(q, k, v, dout, window, documents)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, window, documents, impl="dense")
    out.backward(dout)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got.double(), want, **FP32, msg=lambda m, name=name: f"{case} {name}: {m}")


def test_bf16_matches_reference():
    documents = documents_of(2, SEQ)
    q, k, v, dout = _inputs(SHAPES[0], SEQ, torch.bfloat16, seed=7)
    expected = reference(q, k, v, dout, 4, documents)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, 4, documents)
    out.backward(dout)
    for got, want in zip((out, q.grad, k.grad, v.grad), expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, **BF16)


def test_no_mask_is_plain_causal_sdpa():
    q, k, v, _ = _inputs(SHAPES[0], SEQ, torch.float32, seed=1)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for impl in am.IMPLS:
        assert torch.equal(masked_attention(q, k, v, None, None, impl=impl), expected)


@pytest.mark.parametrize(("window", "with_docs"), [(3, False), (None, True), (4, True)])
def test_flex_forward_matches_dense_on_cpu(window, with_docs):
    """FlexAttention runs forward only on CPU (eager, unfused); its backward is covered where CUDA is."""
    q, k, v, _ = _inputs(SHAPES[0], SEQ, torch.float32, seed=2)
    documents = documents_of(2, SEQ) if with_docs else None
    with torch.no_grad():
        got = masked_attention(q, k, v, window, documents, impl="flex")
        want = masked_attention(q, k, v, window, documents, impl="dense")
    torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("impl", ["dense", "flex"])
def test_queries_at_given_positions_see_the_whole_sequence(impl):
    """CP's all-gather: a rank's queries (two chunks, out of order) against every key, masked by true
    position, equal the whole sequence's attention at those rows (flex: forward only on CPU)."""
    q, k, v, _ = _inputs(SHAPES[0], SEQ, torch.float32, seed=4)
    documents = documents_of(2, SEQ)
    rows = torch.cat([torch.arange(2, 5), torch.arange(SEQ - 5, SEQ - 2)])
    with torch.no_grad():
        got = masked_attention(q[:, :, rows], k, v, 4, documents, impl=impl, q_positions=rows)
        want = masked_attention(q, k, v, 4, documents, impl="dense")[:, :, rows]
    torch.testing.assert_close(got, want, **FP32)


def test_block_masks_are_cached_per_documents_tensor():
    documents = documents_of(2, SEQ)
    first = am._block_mask(3, documents, SEQ, documents.device)
    assert am._block_mask(3, documents, SEQ, documents.device) is first
    assert am._block_mask(4, documents, SEQ, documents.device) is not first
    assert am._block_mask(3, documents.clone(), SEQ, documents.device) is not first
    documents[1, 10:] += 1  # an in-place edit: a new mask, not the stale one
    assert am._block_mask(3, documents, SEQ, documents.device) is not first


def test_window_is_transformers_sliding_window():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    seq, window = 9, 3
    rule = masking_utils.sliding_window_causal_mask_function(window)
    positions = torch.arange(seq)
    theirs = rule(torch.tensor(0), torch.tensor(0), positions[:, None], positions[None, :])
    assert torch.equal(attention_mask(positions, positions, window, None)[0], theirs)


def test_attention_mask_by_true_positions():
    """Positions index the whole sequence: a slice of queries against any keys is the whole mask's slice."""
    documents = documents_of(2, SEQ)
    q_pos, k_pos = torch.tensor([4, 9, 10, 19]), torch.tensor([0, 3, 9, 18, 19])
    expected = reference_mask(SEQ, 5, documents)[:, 0][:, q_pos][:, :, k_pos]
    assert torch.equal(attention_mask(q_pos, k_pos, 5, documents), expected)


def test_bad_arguments_raise():
    q, k, v, _ = _inputs(SHAPES[0], SEQ, torch.float32, seed=3)
    with pytest.raises(ValueError, match="at least 1 token, got 0"):
        masked_attention(q, k, v, 0, None)
    with pytest.raises(ValueError, match=r"documents must be \[batch, sequence\] = \[2, 20\], got \[2, 19\]"):
        masked_attention(q, k, v, None, documents_of(2, 19))
    with pytest.raises(ValueError, match="one of auto, dense, flex; got 'sparse'"):
        masked_attention(q, k, v, 3, None, impl="sparse")
