"""The rank grid with named axes, and the process groups code asks for by role.

Ranks are laid out as `arange(world).view(pp, dp, cp, tp)` (AXES, outermost first): TP varies
fastest so a TP group sits inside one node, CP next (its ring exchange is the next-heaviest
traffic), then DP, then PP (only activations cross stages). The grid is a torch `DeviceMesh`
built over groups made here (so every group has the configured collective timeout, which
`init_device_mesh` would not give it).

Code asks for a role, never for an axis it merely happens to need today:

    tensor    the TP group: the TP layers' collectives, the vocabulary-parallel loss
    pipeline  the PP group: activations between stages
    context   the CP group: attention's K/V exchange over one sequence's chunks
    batch     which share of the global batch this rank reads (the DP axis)
    grad      gradients are averaged over it, and ZeRO shards span it (dp x cp)
    loss      the loss and token counts are averaged over it (dp x cp)
    expert        the EP group: the ranks splitting each MoE layer's experts, exchanging tokens all-to-all
    expert_grad   the ranks holding the same experts: expert gradients are reduced (and ZeRO-sharded) over it

Expert parallelism is carved out of the dp x cp ranks, as in Megatron: those ranks, flattened (cp
fastest), are cut into EP groups of consecutive ranks, so the expert grid is (pp, edp, ep, tp)
(EXPERT_AXES) over the same ranks. A new axis (a sharded-DP axis) is a new name in AXES and in the
roles that span it; callers do not change. One process without torch.distributed is the trivial mesh: every group
is None and every size is 1.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatronlite.config import Config, validate_layout

AXES = ("pp", "dp", "cp", "tp")
ROLES = {
    "tensor": ("tp",),
    "pipeline": ("pp",),
    "context": ("cp",),
    "batch": ("dp",),
    "grad": ("dp", "cp"),
    "loss": ("dp", "cp"),
}


EXPERT_AXES = ("pp", "edp", "ep", "tp")
EXPERT_ROLES = {"expert": ("ep",), "expert_grad": ("edp",)}


@dataclass(frozen=True)
class Group:
    """The ranks that differ from this one only along some axes: their process group, its size, and
    this rank's index in it (the group's own rank order: the grid's, row-major over those axes)."""

    size: int = 1
    rank: int = 0
    ranks: tuple[int, ...] = (0,)
    pg: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class Mesh:
    world_size: int = 1
    rank: int = 0
    roles: dict[str, Group] = field(default_factory=lambda: {role: Group() for role in {**ROLES, **EXPERT_ROLES}})
    # the ranks holding the first and last stage of this pipeline, for tied embeddings
    embedding_group: dist.ProcessGroup | None = None
    # torch's DeviceMesh over AXES, over the same groups (None for one process): what DTensor-based code
    # (FSDP2 / ZeRO-3, DTensor checkpoints) builds on
    device_mesh: object | None = None

    def role(self, name: str) -> Group:
        return self.roles[name]

    # the roles every layer uses, by their usual names
    @property
    def tp(self) -> int:
        return self.roles["tensor"].size

    @property
    def tp_rank(self) -> int:
        return self.roles["tensor"].rank

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.roles["tensor"].pg

    @property
    def pp(self) -> int:
        return self.roles["pipeline"].size

    @property
    def pp_rank(self) -> int:
        return self.roles["pipeline"].rank

    @property
    def cp(self) -> int:
        return self.roles["context"].size

    @property
    def cp_rank(self) -> int:
        return self.roles["context"].rank

    @property
    def dp(self) -> int:
        """The number of model replicas reading different data (the batch role's size)."""
        return self.roles["batch"].size

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics: the last stage (it has the loss) of the first rank of every other role."""
        return self.is_last_stage and self.roles["loss"].rank == 0 and self.tp_rank == 0


def rank_grid(world_size: int, tp: int, pp: int, cp: int = 1) -> torch.Tensor:
    """Global ranks by coordinate, dims in AXES order."""
    return torch.arange(world_size).view(pp, world_size // (tp * pp * cp), cp, tp)


def expert_grid(grid: torch.Tensor, ep: int) -> torch.Tensor:
    """The same ranks by expert coordinate, dims in EXPERT_AXES order: dp x cp flattened, cut into EP groups."""
    pp, dp, cp, tp = grid.shape
    return grid.reshape(pp, dp * cp // ep, ep, tp)


def collective_timeout(minutes: float) -> datetime.timedelta:
    """How long a collective may wait: `parallel.timeout_minutes` plus a margin. The watchdog (which names the
    stalled rank and writes every thread's stack) ends a job after the configured time without progress;
    the collectives' own timeout, a little later, is the backstop where the watchdog cannot run."""
    return datetime.timedelta(seconds=minutes * 60 * 1.25 + 10)


def new_group(cfg: Config, ranks: list[int] | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """A process group with the collective timeout (torch does not give new groups the world's)."""
    return dist.new_group(ranks, timeout=collective_timeout(cfg.parallel.timeout_minutes), backend=backend)


def _lines(grid: torch.Tensor, axes: tuple[str, ...], names: tuple[str, ...] = AXES) -> list[list[int]]:
    """Every group of ranks that differ only along `axes` (of the grid's dims `names`), each ascending (the grid's
    order, as torch numbers a group's ranks: a rank's index in its line is its rank in the group)."""
    dims = sorted(names.index(a) for a in axes)
    rest = [d for d in range(grid.ndim) if d not in dims]
    return grid.permute(*rest, *dims).reshape(-1, math.prod(grid.shape[d] for d in dims)).tolist()


def build_mesh(cfg: Config, world_size: int, rank: int) -> Mesh:
    """Validate the layout for `world_size` and create this rank's process groups, one per role.

    Roles spanning the same axes of size > 1 share one group (with CP = 1, `grad` is the DP group)."""
    validate_layout(cfg, world_size)
    if world_size == 1:
        return Mesh()
    p = cfg.parallel
    grid = rank_grid(world_size, p.tensor, p.pipeline, p.context)
    sizes = dict(zip(AXES, grid.shape))

    def spanned(axes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a for a in axes if sizes[a] > 1)

    made: dict[tuple[str, ...], Group] = {}
    for axes in dict.fromkeys([spanned((a,)) for a in AXES] + [spanned(r) for r in ROLES.values()]):
        for line in _lines(grid, axes):
            group = new_group(cfg, line)  # every rank takes part in creating every group
            if rank in line:
                made[axes] = Group(len(line), line.index(rank), tuple(line), group)
    experts = expert_grid(grid, p.expert)
    made_lines = {tuple(line) for axes in made for line in _lines(grid, axes)}
    expert_roles = {}
    for role, axes in EXPERT_ROLES.items():
        for line in _lines(experts, axes, EXPERT_AXES):
            # the same ranks as a role already made (EP 1: expert_grad is grad) share its group
            fresh = len(line) > 1 and tuple(line) not in made_lines
            group = new_group(cfg, line) if fresh else None  # made by every rank, as every group is
            if rank in line:
                same = next((g for g in made.values() if g.ranks == tuple(line)), None)
                expert_roles[role] = same or Group(len(line), line.index(rank), tuple(line), group)
    embedding_group = None
    for line in _lines(grid, ("pp",)):
        ends = sorted({line[0], line[-1]})
        group = new_group(cfg, ends) if len(ends) > 1 else None
        if rank in ends and rank in line:
            embedding_group = group
    from torch.distributed.device_mesh import DeviceMesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device_mesh = DeviceMesh.from_group(
        [made[spanned((a,))].pg for a in AXES], device_type, mesh=grid, mesh_dim_names=AXES
    )
    return Mesh(
        world_size=world_size,
        rank=rank,
        roles={**{role: made[spanned(axes)] for role, axes in ROLES.items()}, **expert_roles},
        embedding_group=embedding_group,
        device_mesh=device_mesh,
    )


def init_distributed(device_kind: str, timeout_minutes: float) -> tuple[int, int, int]:
    """Join the job started by torchrun or srun; return (world_size, rank, local_rank).

    A single process with no launcher environment runs without torch.distributed at all.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # `srun megatronlite train ...`: one task per GPU, ranks from Slurm
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_PORT", "29500")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        kwargs = {}
        if device_kind == "cuda":
            kwargs["device_id"] = cuda_device(local_rank)
        dist.init_process_group(
            backend, timeout=collective_timeout(timeout_minutes), rank=rank, world_size=world_size, **kwargs
        )
    return world_size, rank, local_rank


def cuda_device(local_rank: int) -> torch.device:
    """This worker's GPU. Under srun's per-task binding (`--gpus-per-task`, cgroups) each task sees only its own
    GPU as cuda:0 while LOCAL_RANK counts every task on the node, so the index wraps over the visible devices."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _first_slurm_host() -> str:
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]
