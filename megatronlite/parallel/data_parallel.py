"""Data parallelism: gradients in contiguous buckets, reduced over DP while backward still runs.

"DP" here is the mesh's `grad` role: the ranks holding the same parameters and different tokens
(the DP axis, and the CP axis when sequences are split), so gradients are averaged over dp x cp.

Every parameter and its gradient live in flat per-bucket buffers (`p.data` and `p.grad` are
views), filled in reverse registration order, which is roughly the order backward produces
gradients. A post-accumulate-grad hook counts the gradients each bucket has received; when a
bucket has all of them for the last micro-batch, its reduction is launched asynchronously, so
reduction overlaps the rest of backward and nothing is communicated during accumulation.

Three ways to reduce a bucket (`parallel.zero_stage`):
- 0, plain DP: all-reduce, then every rank steps every parameter;
- 1, distributed optimizer (ZeRO-1): reduce-scatter, each DP rank steps only its 1/D of every
  bucket (its fp32 weights and Adam states), then the updated weights are all-gathered;
- 2 (ZeRO-2): as 1, but no full-size gradient is kept. A parameter's gradient is copied into its
  bucket's buffer as backward produces it (and the parameter's own freed); each micro-batch's
  complete bucket is reduce-scattered at once and its 1/D added into the rank's shard, and the
  buffer is dropped when that reduction is done. Full-size gradient memory is the buckets in
  flight, not the model.

Expert weights (split over expert parallelism) go into buckets of their own, reduced over the
`expert_grad` role (the ranks holding the same experts) instead: their gradients already hold every
token routed to them from the whole EP group, so the sum over expert_grad, divided by the full dp x cp
size like every other gradient, is the average over the global batch (ZeRO shards them over expert_grad).

Gradients that need a sum over another group first (sequence-parallel norms over TP; a tied
embedding over the first and last pipeline stage) go into a last bucket, reduced after those sums
(accumulated full-size under ZeRO-2 too: norms and the tied embedding only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatronlite.parallel.mesh import Group
from megatronlite.parallel.sharding import ShardedParameter


@dataclass
class OwnedSlice:
    """The part of one parameter this rank's optimizer steps: with ZeRO-1 a flat slice, else all of it."""

    param: nn.Parameter  # the whole parameter (a view of the bucket)
    shard: nn.Parameter  # what the optimizer steps: the slice (a view of the same bucket memory), or `param`
    start: int  # the slice's start and end in the flattened parameter
    end: int


@dataclass
class Bucket:
    params: list[nn.Parameter]
    group: Group  # the ranks it is reduced (and ZeRO-sharded) over
    param_buf: torch.Tensor
    grad_buf: torch.Tensor | None  # ZeRO-2: the micro-batch's gradients, only while they are being gathered
    offsets: list[int] = field(default_factory=list)  # each parameter's start in the buffers
    sharded: bool = False  # ZeRO (stage >= 1) over a group of more than one rank
    grad_shard: torch.Tensor | None = None  # distributed optimizer: this rank's reduced slice
    streamed: bool = False  # ZeRO-2: reduce-scattered per micro-batch into grad_shard
    in_flight: list[tuple[object, torch.Tensor]] = field(default_factory=list)  # ZeRO-2: (request, 1/D result)
    expected: int = 0  # gradient accumulations that complete the bucket in one step
    received: int = 0
    handle: object | None = None
    late: bool = False
    shard_range: tuple[int, int] = (0, 0)
    owned: list[OwnedSlice] = field(default_factory=list)  # distributed optimizer: this rank's slices


def _is_expert(p: nn.Parameter) -> bool:
    return p.sharding.split("ep") is not None


class DataParallel:
    def __init__(
        self,
        named_params: dict[str, nn.Parameter],
        group: Group,
        n_micro: int,
        zero_stage: int,
        bucket_mb: float,
        late_names: set[str],
        expert_group: Group | None = None,
    ) -> None:
        """`group`: the grad role (dp x cp); `expert_group`: the expert_grad role, for expert weights."""
        self.group, self.n_micro, self.zero_stage = group, n_micro, zero_stage
        self.buckets: list[Bucket] = []
        names = list(named_params)[::-1]
        limit = int(bucket_mb * 2**20 / 4)
        kinds = ((group, lambda p: not _is_expert(p)), (expert_group or group, _is_expert))
        for kind_group, is_kind in kinds:
            current, size = [], 0
            for name in names:
                p = named_params[name]
                if name in late_names or not is_kind(p):
                    continue
                current.append(p)
                size += p.numel()
                if size >= limit:
                    self.buckets.append(self._make_bucket(current, kind_group, late=False))
                    current, size = [], 0
            if current:
                self.buckets.append(self._make_bucket(current, kind_group, late=False))
        for kind_group, is_kind in kinds:  # last: reduced after the sums over their other groups
            late = [named_params[n] for n in names if n in late_names and is_kind(named_params[n])]
            if late:
                self.buckets.append(self._make_bucket(late, kind_group, late=True))
        self.owner_of = {id(p): b for b in self.buckets for p in b.params}
        self.offset_of = {id(p): start for b in self.buckets for p, start in zip(b.params, b.offsets)}
        for p in named_params.values():
            p.register_post_accumulate_grad_hook(self._on_grad)

    @property
    def sharded(self) -> bool:
        """Whether any bucket's optimizer states (and gradients) are ZeRO-sharded."""
        return any(b.sharded for b in self.buckets)

    def _make_bucket(self, params: list[nn.Parameter], group: Group, late: bool) -> Bucket:
        numel = sum(p.numel() for p in params)
        dp = group.size
        sharded = self.zero_stage >= 1 and dp > 1
        padded = -(-numel // dp) * dp if sharded else numel
        ref = params[0]
        streamed = sharded and self.zero_stage == 2 and not late
        param_buf = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
        grad_buf = None if streamed else torch.zeros(padded, dtype=torch.float32, device=ref.device)
        offsets, offset = [], 0
        for p in params:
            n = p.numel()
            param_buf[offset : offset + n].copy_(p.data.reshape(-1))
            p.data = param_buf[offset : offset + n].view_as(p)
            p.grad = None if streamed else grad_buf[offset : offset + n].view_as(p)
            offsets.append(offset)
            offset += n
        bucket = Bucket(params, group, param_buf, grad_buf, offsets, sharded, expected=len(params) * self.n_micro)
        bucket.streamed, bucket.late = streamed, late
        if sharded:
            per = padded // dp
            lo, hi = group.rank * per, (group.rank + 1) * per
            bucket.shard_range = (lo, hi)
            bucket.grad_shard = torch.zeros(per, dtype=torch.float32, device=ref.device)
            for p, start in zip(params, offsets):
                a, b = max(start, lo), min(start + p.numel(), hi)
                if a < b:
                    sp = ShardedParameter(param_buf[a:b], p.sharding)
                    sp.grad = bucket.grad_shard[a - lo : b - lo]
                    bucket.owned.append(OwnedSlice(p, sp, a - start, b - start))
        return bucket

    # --- what the optimizer steps ------------------------------------------------------------
    def optimizer_params(self, named_params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """The tensors the optimizer owns: every parameter, or with ZeRO-1 this rank's slices of them."""
        if not self.sharded:
            return named_params
        name_of = {id(p): n for n, p in named_params.items()}
        return {f"{name_of[id(o.param)]}[{o.start}:{o.end}]": o.shard for o in self.owned_slices()}

    def owned_slices(self) -> list[OwnedSlice]:
        """What this rank's optimizer steps, as slices of the flattened parameters: with ZeRO-1 its slices of
        every sharded bucket, else every parameter whole. The optimizer's states of `shard` hold [start, end) of
        the parameter, so a checkpoint saves and loads them in place (see checkpoint/views.py)."""
        out = []
        for bucket in self.buckets:
            out += bucket.owned if bucket.sharded else [OwnedSlice(p, p, 0, p.numel()) for p in bucket.params]
        return out

    # --- reduction --------------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        bucket = self.owner_of[id(p)]
        bucket.received += 1
        if bucket.streamed:
            self._gather_grad(bucket, p)
        elif bucket.received == bucket.expected and not bucket.late:
            self._launch(bucket)

    def _gather_grad(self, bucket: Bucket, p: nn.Parameter) -> None:
        """ZeRO-2: move `p`'s gradient into the bucket's buffer; a complete micro-batch's bucket is reduced."""
        if bucket.grad_buf is None:
            bucket.grad_buf = torch.zeros_like(bucket.param_buf, dtype=torch.float32)
        start = self.offset_of[id(p)]
        bucket.grad_buf[start : start + p.numel()].add_(p.grad.reshape(-1))
        p.grad = None
        if bucket.received % len(bucket.params) == 0:
            self._settle(bucket)  # at most one reduction of a bucket in flight
            out = torch.empty_like(bucket.grad_shard)
            request = dist.reduce_scatter_tensor(out, bucket.grad_buf, group=bucket.group.pg, async_op=True)
            bucket.in_flight.append((request, out))
            bucket.grad_buf = None  # the reduction holds it until done

    @staticmethod
    def _settle(bucket: Bucket) -> None:
        """ZeRO-2: wait for the bucket's reductions and add their results into its shard."""
        for request, out in bucket.in_flight:
            request.wait()
            bucket.grad_shard.add_(out)
        bucket.in_flight.clear()

    def _launch(self, bucket: Bucket) -> None:
        if bucket.group.size == 1:
            return
        if bucket.sharded:
            bucket.handle = dist.reduce_scatter_tensor(
                bucket.grad_shard, bucket.grad_buf, group=bucket.group.pg, async_op=True
            )
        else:
            bucket.handle = dist.all_reduce(bucket.grad_buf, group=bucket.group.pg, async_op=True)

    def finish(self, pre_reduce_late) -> None:
        """Wait for every bucket; sum the late gradients over their other groups, then reduce them.

        A bucket whose hooks did not all fire (a schedule that computes weight gradients outside
        autograd's accumulation, like zero-bubble's split backward) is reduced here instead.
        """
        summed = False
        for bucket in self.buckets:
            if bucket.streamed:
                if bucket.received != bucket.expected:
                    raise RuntimeError(f"ZeRO-2: a bucket got {bucket.received} of {bucket.expected} gradients")
                self._settle(bucket)
                bucket.grad_shard.div_(self.group.size)
                bucket.received = 0
                continue
            if bucket.late and not summed:
                pre_reduce_late()
                summed = True
            if bucket.handle is None:
                self._launch(bucket)
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
            if self.group.size > 1:  # the grad role's size, expert buckets too (see the module docstring)
                (bucket.grad_shard if bucket.sharded else bucket.grad_buf).div_(self.group.size)
            bucket.received = 0

    def gather_params(self) -> None:
        """ZeRO-1: every rank's updated slices -> the full weights on every rank."""
        for bucket in self.buckets:
            if bucket.sharded:
                lo, hi = bucket.shard_range
                dist.all_gather_into_tensor(bucket.param_buf, bucket.param_buf[lo:hi].clone(), group=bucket.group.pg)

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            if bucket.grad_buf is not None:
                bucket.grad_buf.zero_()
            if bucket.grad_shard is not None:
                bucket.grad_shard.zero_()
