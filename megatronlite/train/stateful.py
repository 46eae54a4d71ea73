"""What a checkpoint holds, as named stateful parts (model, optimizer, schedule, data position, loss scaler, router
biases; the checkpointer adds the RNG): each gives its tensors as global pieces and its small values for meta.json,
and takes both back on a load. The checkpointer saves and restores parts, and reaches into nothing else; a new
kind of state is a new part, not a change to the checkpointer.

meta.json keeps one flat mapping (`step`, `optimizer_steps`, `consumed_samples`, `loss_scale`, ...), the union of
the parts' values, so checkpoints from before the parts read the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from megatronlite.checkpoint.views import GlobalPiece


def _no_pieces(for_save: bool) -> list[GlobalPiece]:
    return []


def _nothing(meta: dict) -> None:
    return None


@dataclass(frozen=True)
class Stateful:
    pieces: Callable[[bool], list[GlobalPiece]] = _no_pieces  # views a save writes and a load reads into
    values: Callable[[], dict] = field(default=dict)  # entries of meta.json
    restore: Callable[[dict], None] = _nothing  # after the pieces were read: from the whole meta.json


def all_pieces(parts: dict[str, Stateful], for_save: bool) -> list[GlobalPiece]:
    return [piece for part in parts.values() for piece in part.pieces(for_save)]


def all_values(parts: dict[str, Stateful]) -> dict:
    return {key: value for part in parts.values() for key, value in part.values().items()}
