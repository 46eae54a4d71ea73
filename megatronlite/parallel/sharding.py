"""How a parameter's local tensor relates to its global tensor, one entry per mesh axis.

A `Sharding` names, for each mesh axis that splits the tensor, a `Split` (the dim, its fused
parts, the padding before the split); every axis not named holds the whole tensor (replicated).
Two axes split parameters (SPLIT_AXES): `tp` (the TP layers) and `ep` (expert weights, [experts, ...],
`Split(0)` over the expert-parallel ranks); `pp` gives stages different parameters, `dp` and `cp`
replicate them, and ZeRO shards optimizer states by flat ranges of the buckets (see data_parallel.py). A
sharded-DP axis would add `Split(0)` over it to every parameter: one more entry in SPLIT_AXES and in the
readers of the splits (init.py, checkpoint/views.py), which refuse any other axis until then.

One description drives the seeded init (the full tensor drawn, then sliced), the layout-free
checkpoint views, the converters and the gradient clipping rule. A parameter carries it as a
typed field of `ShardedParameter`, set when the parameter is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# the axes parameters can be split over today: init, checkpoint views and converters read these splits
SPLIT_AXES = ("tp", "ep")


@dataclass(frozen=True)
class Split:
    """Split along `dim` over one mesh axis; each fused part (concatenated along `dim`) is split on its own."""

    dim: int
    parts: tuple[str, ...] = ()
    padded: int | None = None  # size of `dim` after padding (vocab), before the split


@dataclass(frozen=True)
class Sharding:
    """A parameter's global shape and, per mesh axis, how its local tensor is cut from it."""

    global_shape: tuple[int, ...]  # of one part, unpadded
    splits: tuple[tuple[str, Split], ...] = ()  # (axis, how it splits); axes not named: replicated
    init: str = "normal"  # normal | scaled_normal | zeros | ones
    partial_grad: tuple[str, ...] = ()  # mesh roles over which each rank's gradient is a partial sum (SP: tensor)
    alias: str | None = None  # a copy of another global tensor (a tied output layer on the last stage)

    def __post_init__(self) -> None:
        axes = [axis for axis, _ in self.splits]
        if any(axis not in SPLIT_AXES for axis in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"a parameter splits over each of {SPLIT_AXES} at most once, not over {axes}")

    def split(self, axis: str) -> Split | None:
        return dict(self.splits).get(axis)

    # --- the TP split, which the TP layers, checkpoint views and converters read -------------------
    @property
    def dim(self) -> int | None:
        """The dim split over TP; None: the same tensor on every TP rank."""
        tp = self.split("tp")
        return None if tp is None else tp.dim

    @property
    def parts(self) -> tuple[str, ...]:
        tp = self.split("tp")
        return () if tp is None else tp.parts

    def part_names(self) -> tuple[str, ...]:
        return self.parts or ("",)

    def local_slice(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's slice of one part's full (unpadded) tensor."""
        tp = self.split("tp")
        if tp is None:
            return full
        if tp.padded is not None and tp.padded > full.shape[tp.dim]:
            pad_shape = list(full.shape)
            pad_shape[tp.dim] = tp.padded - full.shape[tp.dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=tp.dim)
        return full.chunk(tp_size, dim=tp.dim)[tp_rank]

    def expert_slice(self, full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
        """This expert-parallel rank's experts of a full [experts, ...] tensor (the tensor itself if not split)."""
        ep = self.split("ep")
        return full if ep is None else full.chunk(ep_size, dim=ep.dim)[ep_rank]

    def local_rows(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """The [start, end) range of the global (unpadded) split dim this TP rank holds, per part."""
        tp = self.split("tp")
        real = self.global_shape[tp.dim]
        per = (tp.padded or real) // tp_size
        start = min(tp_rank * per, real)
        return start, min(start + per, real)


def tp_split(
    global_shape: tuple[int, ...],
    dim: int,
    parts: tuple[str, ...] = (),
    padded: int | None = None,
    init: str = "normal",
    alias: str | None = None,
) -> Sharding:
    """A tensor split over TP along `dim` (a column- or row-parallel weight, an embedding table)."""
    return Sharding(global_shape, (("tp", Split(dim, parts, padded)),), init, alias=alias)


def expert_split(global_shape: tuple[int, ...], init: str = "normal", partial_over_tp: bool = False) -> Sharding:
    """Stacked expert weights [experts, ...], each expert-parallel rank holding its block of experts (whole on
    every TP rank; `partial_over_tp`: sequence parallelism gave each TP rank its own tokens)."""
    return Sharding(global_shape, (("ep", Split(0)),), init, partial_grad=("tensor",) if partial_over_tp else ())


def replicated(global_shape: tuple[int, ...], init: str = "normal", partial_over_tp: bool = False) -> Sharding:
    """A tensor whole on every rank; `partial_over_tp`: each TP rank's gradient is a partial sum (sequence
    parallelism: each rank saw its share of the tokens; q/k norms: each rank normed its own heads)."""
    return Sharding(global_shape, init=init, partial_grad=("tensor",) if partial_over_tp else ())


class ShardedParameter(nn.Parameter):
    """A parameter with its `Sharding`, given when it is made (ZeRO's flat slices carry their parameter's)."""

    sharding: Sharding

    def __new__(cls, data: torch.Tensor, sharding: Sharding, requires_grad: bool = True) -> ShardedParameter:
        param = super().__new__(cls, data, requires_grad)
        param.sharding = sharding
        return param

    def __deepcopy__(self, memo: dict) -> ShardedParameter:
        """nn.Parameter's would pass `requires_grad` where the sharding goes."""
        if id(self) not in memo:
            data = self.data.clone(memory_format=torch.preserve_format)
            memo[id(self)] = ShardedParameter(data, self.sharding, self.requires_grad)
        return memo[id(self)]


def empty_param(local_shape: tuple[int, ...], sharding: Sharding) -> ShardedParameter:
    """An uninitialised local parameter (init.py fills it from the seeded global tensor)."""
    return ShardedParameter(torch.empty(local_shape), sharding)
