"""The fused, chunked linear + cross-entropy against F.linear + vocab_parallel_cross_entropy on full logits.

Both backends (torch chunk ops, and the Triton ones where triton runs) are checked at TP = 1 with
padded vocabulary columns, uneven chunks, bf16 and autocast, and at TP = 2 (two gloo processes)
where one case leaves a rank with nothing but padding.
"""

import importlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn

from megatronlite.kernels import linear_cross_entropy
from megatronlite.kernels.dispatch import triton_problem
from megatronlite.kernels.reference import CE_CHUNK_OPS as reference_ops
from megatronlite.kernels.testing import TOLERANCES, poisoned_allocations
from megatronlite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatronlite.parallel.mesh import Mesh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP = triton_problem(DEVICE)
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(SKIP is not None, reason=f"triton cases skipped: {SKIP}")),
]
HIDDEN, PADDED_VOCAB = 32, 128
lce = importlib.import_module("megatronlite.kernels.linear_cross_entropy")  # the package exports the function


def inputs(n_tokens, vocab_size, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, HIDDEN, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(PADDED_VOCAB, HIDDEN, generator=g) * 0.3).to(device, dtype).requires_grad_()
    target = torch.randint(0, vocab_size, (n_tokens,), generator=g).to(device)
    return hidden, weight, target


def reference(hidden, weight, target, vocab_size):
    """Mean loss and its gradients through the unfused path the model uses today."""
    loss = vocab_parallel_cross_entropy(F.linear(hidden, weight), target, vocab_size, Mesh()).mean()
    return loss, *torch.autograd.grad(loss, [hidden, weight])


def fused(hidden, weight, target, vocab_size, impl, tp_group=None, chunk_size=None):
    with poisoned_allocations():
        loss = linear_cross_entropy(hidden, weight, target, vocab_size, tp_group, impl, chunk_size)
        return loss, *torch.autograd.grad(loss, [hidden, weight])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [5, None], ids=["uneven-chunks", "default-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_unfused_with_padded_vocab(impl, chunk_size, dtype):
    vocab_size = 101  # 27 padding columns
    hidden, weight, target = inputs(13, vocab_size, dtype)
    target[0] = vocab_size - 1  # the last real column
    expected = reference(hidden, weight, target, vocab_size)
    got = fused(hidden, weight, target, vocab_size, impl, chunk_size=chunk_size)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g.float(), e.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_bf16_matches_unfused(impl):
    hidden, weight, target = inputs(2 * 6, 120, seed=1)
    hidden3d, target2d = hidden.view(2, 6, HIDDEN), target.view(2, 6)  # [batch, seq, h] is accepted too
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        expected = reference(hidden, weight, target, 120)
        got = fused(hidden3d, weight, target2d, 120, impl, chunk_size=4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.view_as(e).float(), e.float(), **TOLERANCES[torch.bfloat16])


def _tp_worker(rank, world, impls):
    rows = PADDED_VOCAB // world
    for vocab_size in (100, 60):  # rank 1 holds 36 padding columns, or only padding
        hidden, weight, target = inputs(11, vocab_size, seed=vocab_size, device="cpu")
        loss, grad_hidden, grad_weight = reference(hidden, weight, target, vocab_size)
        shard = weight.detach()[rank * rows : (rank + 1) * rows].clone().requires_grad_()
        for impl in impls:
            got_loss, got_hidden, got_weight = fused(hidden, shard, target, vocab_size, impl, dist.group.WORLD, 4)
            dist.all_reduce(got_hidden)  # what copy_to_tp's backward does with the partial gradients
            tol = TOLERANCES[torch.float32]
            torch.testing.assert_close(got_loss, loss, **tol)
            torch.testing.assert_close(got_hidden, grad_hidden, **tol)
            torch.testing.assert_close(got_weight, grad_weight[rank * rows : (rank + 1) * rows], **tol)


@pytest.mark.slow
def test_tensor_parallel_two_ranks():
    """On CPU with gloo; the TP logic lives in the backend-independent driver, so CPU covers it."""
    impls = ["torch"] + (["triton"] if triton_problem("cpu") is None else [])
    spawn(_tp_worker, 2, impls, timeout=240)


def plain_fp32(hidden, weight, target, vocab_size):
    """Loss and gradients of plain F.linear + F.cross_entropy in fp32 math on the same inputs, cast back."""
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    loss = F.cross_entropy(F.linear(h32, w32)[:, :vocab_size], target)
    grads = torch.autograd.grad(loss, [h32, w32])
    return loss, *(g.to(t.dtype) for g, t in zip(grads, (hidden, weight)))


PLAIN_TOLERANCES = {  # against fp32 math: one rounding of the inputs' dtype, and fp16's shorter exponent
    torch.float32: TOLERANCES[torch.float32],
    torch.bfloat16: TOLERANCES[torch.bfloat16],
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rare_words_get_their_gradient(impl, dtype):
    """Words no token targets, with softmax terms near e^-10, still get their small weight gradient.

    Their gradient is the sum over tokens of p * h / n; at n = 512 each p / n is about 1e-9, under
    fp16's smallest subnormal, so scaling by 1/n before the cast to fp16 zeroed those rows.
    """
    n, vocab_size, common = 512, 101, 10
    hidden, weight, _ = inputs(n, vocab_size, seed=3, device="cpu")
    target = torch.randint(0, common, (n,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # a constant feature makes every uncommon word's logit about 10 lower
        hidden[:, 0] = 1.0
        weight[:, 0] = 0.0
        weight[common:, 0] = -10.0
    hidden, weight, target = (t.detach().to(DEVICE) for t in (hidden, weight, target))
    hidden, weight = (t.to(dtype).requires_grad_() for t in (hidden, weight))
    expected = plain_fp32(hidden, weight, target, vocab_size)
    got = fused(hidden, weight, target, vocab_size, impl, chunk_size=100)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g.float(), e.float(), **PLAIN_TOLERANCES[dtype])
    rare_got, rare_expected = got[2][common:vocab_size].float(), expected[2][common:vocab_size].float()
    scale = rare_expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(rare_got, rare_expected, rtol=2e-2, atol=1e-2 * scale)


def test_default_chunks_hold_thousands_of_tokens_within_the_budget(monkeypatch):
    assert lce.default_chunk_size(16_384, 128_256) == lce.CHUNK_BYTES // (4 * 128_256) > 2000
    assert lce.default_chunk_size(100, 128_256) == 100
    monkeypatch.setattr(lce, "CHUNK_BYTES", 4 * PADDED_VOCAB * 3)  # three tokens' fp32 logits: uneven chunks
    hidden, weight, target = inputs(13, 101, seed=5)
    for g, e in zip(fused(hidden, weight, target, 101, "torch"), reference(hidden, weight, target, 101)):
        torch.testing.assert_close(g, e, **TOLERANCES[torch.float32])


def _refuse(*args):
    raise AssertionError("a gradient was computed although none was asked for")


@pytest.mark.parametrize("no_grad", [True, False], ids=["under-no_grad", "inputs-without-grad"])
def test_evaluation_computes_no_gradient(no_grad):
    """No graph, and the chunk ops' gradient step never runs, under no_grad or for inputs that need none."""
    hidden, weight, target = inputs(13, 101, seed=6)
    expected = reference(hidden, weight, target, 101)[0]
    ops = reference_ops._replace(grad_=_refuse)
    if no_grad:
        with torch.no_grad():
            loss = lce.linear_cross_entropy(hidden, weight, target, 101, None, 4, ops)
    else:
        loss = lce.linear_cross_entropy(hidden.detach(), weight.detach(), target, 101, None, 4, ops)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach(), **TOLERANCES[torch.float32])


def test_frozen_weight_gets_no_gradient_buffer(monkeypatch):
    """Only the hidden states need a gradient: the fp32 [V, h] weight gradient is never allocated."""
    hidden, weight, target = inputs(13, 101, seed=7)
    expected = reference(hidden, weight, target, 101)[1]
    zeros = torch.zeros

    def no_weight_gradient(*shape, **kwargs):
        assert tuple(shape[0] if len(shape) == 1 else shape) != tuple(weight.shape)
        return zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", no_weight_gradient)
    loss = lce.linear_cross_entropy(hidden, weight.detach(), target, 101, None, 4, reference_ops)
    (got,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
