"""How one format's tensors determine megatronlite's global tensors, and back.

A `Rule` ties a few of our global tensors (`ours`) to a few of a format's tensors (`theirs`)
with a function each way; a format is a list of rules for one model config. Every function
here is plain tensor reshaping, so running it on `meta` tensors yields the shapes a format
must have without touching data, and running it on real tensors moves one rule's worth of
memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Tensors = tuple[torch.Tensor, ...]
Get = Callable[[str], torch.Tensor]


def _same(*tensors: torch.Tensor) -> Tensors:
    return tensors


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[..., Tensors] = _same
    to_theirs: Callable[..., Tensors] = _same


def rename(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


class Mapping:
    """The rules of one format for one config, usable in both directions."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._by_ours = {n: r for r in rules for n in r.ours}
        self._by_theirs = {n: r for r in rules for n in r.theirs}

    def sources(self, name: str) -> tuple[str, ...]:
        """The format's tensors our tensor `name` is made from."""
        return self._by_ours[name].theirs

    def ours(self, name: str, get_theirs: Get) -> torch.Tensor:
        """Our tensor `name`, made from the format's tensors (one rule's inputs in memory)."""
        rule = self._by_ours[name]
        return rule.to_ours(*map(get_theirs, rule.theirs))[rule.ours.index(name)]

    def theirs(self, name: str, get_ours: Get) -> torch.Tensor:
        """The format's tensor `name`, made from ours."""
        rule = self._by_theirs[name]
        return rule.to_theirs(*map(get_ours, rule.ours))[rule.theirs.index(name)]

    def stream_theirs(self, get_ours: Get) -> Iterator[tuple[str, torch.Tensor]]:
        """Every format tensor in rule order, each rule's inputs read once."""
        for rule in self.rules:
            yield from zip(rule.theirs, rule.to_theirs(*map(get_ours, rule.ours)))

    def their_shapes(self, our_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shape each format tensor must have, computed on meta tensors."""

        def meta(name: str) -> torch.Tensor:
            return torch.empty(our_shapes[name], device="meta")

        return {name: tuple(t.shape) for name, t in self.stream_theirs(meta)}


# --- the reshapings formats share ----------------------------------------------------------------


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Separate Q, K, V (rows by head) -> one tensor laid out per KV group: [q heads of group g; k_g; v_g] ..."""
    parts = [t.reshape(kv_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int) -> Tensors:
    """The inverse of `group_qkv`: (q, k, v)."""
    per_group = heads // kv_heads
    grouped = qkv.reshape(kv_heads, per_group + 2, -1, *qkv.shape[1:])
    q = grouped[:, :per_group].reshape(-1, *qkv.shape[1:])
    k = grouped[:, per_group].reshape(-1, *qkv.shape[1:])
    v = grouped[:, per_group + 1].reshape(-1, *qkv.shape[1:])
    return q, k, v


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to `rows` (Megatron pads the vocabulary)."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def transposed(ours: str, theirs: str) -> Rule:
    """A weight stored as [in, out] by the format (GPT-2's Conv1D) and [out, in] by us."""
    return Rule((ours,), (theirs,), lambda t: (t.t(),), lambda t: (t.t(),))


def gated_mlp(ours: str, theirs: str, bias: bool) -> list[Rule]:
    """A SwiGLU MLP: our `fc1.*.gate` / `fc1.*.up` / `fc2.*` under `ours` <-> HF's `gate_proj` / `up_proj` /
    `down_proj` under `theirs` (Llama's names; weights, and biases where `bias`)."""
    rules = []
    for s in ("weight", "bias") if bias else ("weight",):
        rules += [
            rename(ours + f"fc1.{s}.gate", theirs + f"gate_proj.{s}"),
            rename(ours + f"fc1.{s}.up", theirs + f"up_proj.{s}"),
            rename(ours + f"fc2.{s}", theirs + f"down_proj.{s}"),
        ]
    return rules


def stacked(ours: str, theirs: list[str]) -> Rule:
    """One tensor of ours [E, ...] <-> E tensors of the format, one per expert (index e is `theirs[e]`)."""
    return Rule((ours,), tuple(theirs), lambda *ts: (torch.stack(ts),), lambda t: tuple(t.unbind(0)))


def fused_pair(first: str, second: str, theirs: str) -> Rule:
    """Two of ours [E, f, h] <-> one of the format [E, 2f, h]: `first`'s rows, then `second`'s."""
    return Rule((first, second), (theirs,), lambda t: t.chunk(2, dim=1), lambda a, b: (torch.cat([a, b], dim=1),))
