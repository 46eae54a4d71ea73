"""Layouts a config may use on N GPUs, and the mesh of any rank of one, built without processes.

`config.validate_layout` is the one legality rule: a candidate is applied to a copy of the config
and kept when that accepts it, so `plan` never offers a layout `train` would refuse.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from megatronlite.config import Config, validate_layout
from megatronlite.errors import UserError
from megatronlite.parallel.mesh import AXES, EXPERT_AXES, EXPERT_ROLES, ROLES, Group, Mesh, expert_grid, rank_grid

RECOMPUTE = ("none", "selective", "full")
MAX_MICRO_BATCH = 16  # larger micro-batches only add activation memory once GEMMs are large


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vp: int  # virtual stages per PP rank (interleaved schedule when > 1)
    cp: int
    dp: int
    micro_batch: int
    zero: int  # parallel.zero_stage
    recompute: str
    sequence_parallel: bool
    ep: int = 1  # experts split over this many of the dp x cp ranks (MoE models)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def name(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"v{self.vp}" if self.vp > 1 else ""), f"cp{self.cp}"]
        parts += [f"ep{self.ep}" if self.ep > 1 else "", f"dp{self.dp}", f"mb{self.micro_batch}"]
        parts += [f"zero{self.zero}" if self.zero else "", self.recompute]
        return " ".join(p for p in parts if p) + (" sp" if self.sequence_parallel else "")


def apply(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` that trains with `layout` (the keys `--set` would change)."""
    out = copy.deepcopy(cfg)
    p, t = out.parallel, out.train
    p.tensor, p.pipeline, p.virtual_pipeline, p.context = layout.tp, layout.pp, layout.vp, layout.cp
    p.expert = layout.ep
    p.sequence_parallel, p.zero_stage, p.distributed_optimizer = layout.sequence_parallel, layout.zero, False
    if p.pipeline_layers is not None and len(p.pipeline_layers) != layout.pp * layout.vp:
        p.pipeline_layers = None  # the config's split is for another number of stages: an even one
    if p.pipeline_schedule is not None and (layout.vp > 1) != (p.schedule in ("interleaved", "zero_bubble")):
        p.pipeline_schedule = None  # the config's schedule does not fit this layout: the one its stages imply
    t.micro_batch_size, t.recompute = layout.micro_batch, layout.recompute
    return out


def layout_of(cfg: Config, gpus: int) -> Layout:
    """The layout `cfg` trains with on `gpus` GPUs (the inverse of `apply`)."""
    p, t = cfg.parallel, cfg.train
    dp = validate_layout(cfg, gpus)
    sp = p.sequence_parallel and p.tensor > 1
    return Layout(
        p.tensor, p.pipeline, p.virtual_pipeline, p.context, dp, t.micro_batch_size, p.zero, t.recompute, sp, p.expert
    )


def mesh_at(cfg: Config, world_size: int, rank: int) -> Mesh:
    """Rank `rank`'s mesh for `cfg`'s layout, every group described (sizes, ranks) but no process group made:
    what model building reads, laid out as `parallel.mesh.build_mesh` lays it out."""
    validate_layout(cfg, world_size)
    p = cfg.parallel
    grid = rank_grid(world_size, p.tensor, p.pipeline, p.context)
    roles = {}
    for ranks, names, role_axes in ((grid, AXES, ROLES), (expert_grid(grid, p.expert), EXPERT_AXES, EXPERT_ROLES)):
        coord = dict(zip(names, (ranks == rank).nonzero()[0].tolist()))
        for role, axes in role_axes.items():
            line = ranks[tuple(slice(None) if a in axes else coord[a] for a in names)].reshape(-1).tolist()
            roles[role] = Group(len(line), line.index(rank), tuple(line))
    return Mesh(world_size=world_size, rank=rank, roles=roles)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _legal(cfg: Config, layout: Layout) -> bool:
    try:
        validate_layout(apply(cfg, layout), layout.gpus)
    except UserError:
        return False
    return True


def layouts(cfg: Config, gpus: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of `gpus` GPUs `cfg` may train with: TP within a node, PP (with virtual stages) over the
    layers, CP over the sequence, DP the rest, EP (MoE models) out of dp x cp; each micro-batch size dividing the
    batch, ZeRO-1 where DP > 1 (and ZeRO-2 without a pipeline), each recompute mode. Sequence parallelism is on
    wherever TP > 1 allows it (it only saves memory)."""
    layers, batch = cfg.model.num_layers, cfg.train.global_batch_size
    for tp, pp, cp in itertools.product(_divisors(min(gpus_per_node, gpus)), _divisors(layers), _divisors(gpus)):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        if batch % dp:
            continue
        vps = [v for v in _divisors(layers // pp) if v > 1] if pp > 1 else []
        experts = cfg.model.moe.num_experts
        eps = [e for e in _divisors(dp * cp) if experts % e == 0] if experts else [1]
        for vp, ep, mb, zero, recompute in itertools.product(
            [1, *vps], eps, [m for m in _divisors(batch // dp) if m <= MAX_MICRO_BATCH], (0, 1, 2), RECOMPUTE
        ):
            if (zero and dp * cp == 1) or (zero == 2 and pp > 1):
                continue
            for sp in (True, False) if tp > 1 else (False,):
                layout = Layout(tp, pp, vp, cp, dp, mb, zero, recompute, sp, ep)
                if _legal(cfg, layout):
                    yield layout
                    break
