"""ZeRO-2 keeps no full-size gradient: after a step's backward each DP rank holds its 1/D of the gradients.

That it trains exactly like one process is tests/test_parallel_equivalence.py's `dp2-zero2` and
`tp2xdp2-zero2-sp`; that its checkpoints resume in other layouts, tests/test_checkpoint_layouts.py's."""

import pytest
import torch
import torch.distributed as dist
from helpers import spawn

from megatronlite.config import ModelConfig
from megatronlite.models.gpt import GPTModel
from megatronlite.models.init import init_parameters
from megatronlite.parallel.data_parallel import DataParallel
from megatronlite.parallel.mesh import Group

MICRO = 2


def _gradient_bytes(rank, world, stage):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=64, max_seq_len=16)
    model = GPTModel(cfg)
    init_parameters(model, cfg, seed=0)
    params = dict(model.named_parameters())
    group = Group(world, rank, tuple(range(world)), dist.group.WORLD)
    dp = DataParallel(params, group, MICRO, stage, bucket_mb=0.01, late_names=set())
    gen = torch.Generator().manual_seed(rank)
    for _ in range(MICRO):
        tokens = torch.randint(0, 64, (2, 17), generator=gen)
        (model(tokens[:, :-1], tokens[:, 1:]) / MICRO).backward()
    dp.finish(lambda: None)
    held = sum(b.grad_buf.numel() for b in dp.buckets if b.grad_buf is not None)
    held += sum(b.grad_shard.numel() for b in dp.buckets if b.grad_shard is not None)
    full = sum(p.numel() for p in params.values())
    padding = world * len(dp.buckets)  # each bucket is padded to a multiple of the DP size
    if stage == 2:
        assert all(p.grad is None for p in params.values())  # copied into the buckets, then freed
        assert held <= full / world + padding, (held, full)
        assert all(not b.in_flight for b in dp.buckets)
    else:  # ZeRO-1: the whole gradient stays, plus the reduced shard
        assert held >= full + full / world, (held, full)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero2_holds_a_dp_share_of_the_gradients(stage):
    spawn(_gradient_bytes, 2, stage, timeout=90)
