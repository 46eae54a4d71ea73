"""Async staging: buffers made at start-up are the ones every save copies into, and hold snapshots."""

import torch

from megatronlite.checkpoint.staging import PieceStager
from megatronlite.checkpoint.views import GlobalPiece


def pieces(weight: torch.Tensor, moment: torch.Tensor) -> list[GlobalPiece]:
    return [
        GlobalPiece("w", weight, tuple(weight.shape), (0, 0)),
        GlobalPiece("optim.exp_avg.w", moment[1:2], (4, 3), (1, 0)),  # views, as TP shards are
        GlobalPiece("optim.exp_avg.w", moment[2:], (4, 3), (2, 0)),  # a key's second box (a ZeRO-1 slice's)
    ]


def test_reserved_buffers_are_reused_and_hold_a_snapshot():
    torch.manual_seed(0)
    weight, moment = torch.randn(4, 3), torch.randn(4, 3)
    stager = PieceStager(pin_memory=False)
    stager.reserve(pieces(weight, moment))
    reserved = {k: b.data_ptr() for k, b in stager.buffers.items()}
    assert set(reserved) == {("w", (0, 0)), ("optim.exp_avg.w", (1, 0)), ("optim.exp_avg.w", (2, 0))}
    for _ in range(2):
        staged = stager.stage(pieces(weight, moment))
        assert {(p.key, p.offset): p.local.data_ptr() for p in staged} == reserved  # no new allocation
        w, first, second = staged
        assert torch.equal(w.local, weight) and torch.equal(first.local, moment[1:2])
        assert torch.equal(second.local, moment[2:]) and second.offset == (2, 0)
        before = weight.clone()
        weight.add_(1.0)  # training goes on: the snapshot must not move with it
        assert torch.equal(w.local, before)


def test_a_changed_shape_gets_a_new_buffer():
    stager = PieceStager(pin_memory=False)
    stager.reserve([GlobalPiece("w", torch.zeros(2, 2), (2, 2), (0, 0))])
    (staged,) = stager.stage([GlobalPiece("w", torch.ones(3, 2), (3, 2), (0, 0))])
    assert staged.local.shape == (3, 2) and torch.equal(staged.local, torch.ones(3, 2))
