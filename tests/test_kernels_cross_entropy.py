"""The fused, chunked linear + cross-entropy against F.linear + vocab_parallel_cross_entropy on full logits.

Both backends (torch chunk ops, and the Triton ones where triton runs) are checked at TP = 1 with
padded vocabulary columns, uneven chunks, bf16 and autocast, and at TP = 2 (two gloo processes)
where one case leaves a rank with nothing but padding.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatronlite.kernels import linear_cross_entropy
from megatronlite.kernels.dispatch import triton_problem
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


def _tp_worker(rank, world, store, impls):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_two_ranks(tmp_path):
    """On CPU with gloo; the TP logic lives in the backend-independent driver, so CPU covers it."""
    impls = ["torch"] + (["triton"] if triton_problem("cpu") is None else [])
    mp.spawn(_tp_worker, args=(2, tmp_path / "store", impls), nprocs=2)
