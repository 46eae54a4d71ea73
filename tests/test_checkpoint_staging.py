"""Async staging: buffers made at start-up are the ones every save copies into, and hold snapshots."""

import torch

from megatronlite.checkpoint.staging import PieceStager
from megatronlite.checkpoint.views import GlobalPiece


def pieces(weight: torch.Tensor, moment: torch.Tensor) -> dict[str, GlobalPiece]:
    return {
        "w": GlobalPiece(weight, tuple(weight.shape), (0, 0)),
        "optim.exp_avg.w": GlobalPiece(moment[1:], (4, 3), (1, 0)),  # a view, as TP shards are
    }


def test_reserved_buffers_are_reused_and_hold_a_snapshot():
    torch.manual_seed(0)
    weight, moment = torch.randn(4, 3), torch.randn(4, 3)
    stager = PieceStager(pin_memory=False)
    stager.reserve(pieces(weight, moment))
    reserved = {k: b.data_ptr() for k, b in stager.buffers.items()}
    assert set(reserved) == {"w", "optim.exp_avg.w"}
    for _ in range(2):
        staged = stager.stage(pieces(weight, moment))
        assert {k: p.local.data_ptr() for k, p in staged.items()} == reserved  # no new allocation
        assert torch.equal(staged["w"].local, weight) and torch.equal(staged["optim.exp_avg.w"].local, moment[1:])
        assert staged["optim.exp_avg.w"].offset == (1, 0)
        before = weight.clone()
        weight.add_(1.0)  # training goes on: the snapshot must not move with it
        assert torch.equal(staged["w"].local, before)


def test_a_changed_shape_gets_a_new_buffer():
    stager = PieceStager(pin_memory=False)
    stager.reserve({"w": GlobalPiece(torch.zeros(2, 2), (2, 2), (0, 0))})
    staged = stager.stage({"w": GlobalPiece(torch.ones(3, 2), (3, 2), (0, 0))})
    assert staged["w"].local.shape == (3, 2) and torch.equal(staged["w"].local, torch.ones(3, 2))
