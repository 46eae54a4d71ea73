"""The rank grid dp x pp x tp and its process groups.

Ranks are laid out as `arange(world).view(dp, pp, tp)`: TP varies fastest so a TP group sits
inside one node, then PP, then DP. Every rank creates every group (torch.distributed requires
all ranks to take part in each `new_group` call) and keeps the ones it belongs to. One process
without torch.distributed is the trivial mesh: every group is None and every size is 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatronlite.config import Config, validate_layout


@dataclass(frozen=True)
class Mesh:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    tp_ranks: tuple[int, ...] = (0,)
    # the ranks holding the first and last stage of this pipeline, for tied embeddings
    embedding_group: dist.ProcessGroup | None = None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics: the last stage (it has the loss) of DP 0, TP 0."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.is_last_stage


def rank_grid(world_size: int, tp: int, pp: int) -> torch.Tensor:
    return torch.arange(world_size).view(world_size // (tp * pp), pp, tp)


def collective_timeout(minutes: float) -> datetime.timedelta:
    """How long a collective may wait: `parallel.timeout_minutes` plus a margin. The watchdog (which names the
    stalled rank and writes every thread's stack) ends a job after the configured time without progress;
    the collectives' own timeout, a little later, is the backstop where the watchdog cannot run."""
    return datetime.timedelta(seconds=minutes * 60 * 1.25 + 10)


def new_group(cfg: Config, ranks: list[int] | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """A process group with the collective timeout (torch does not give new groups the world's)."""
    return dist.new_group(ranks, timeout=collective_timeout(cfg.parallel.timeout_minutes), backend=backend)


def build_mesh(cfg: Config, world_size: int, rank: int) -> Mesh:
    """Validate the layout for `world_size` and create this rank's process groups."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    dp = validate_layout(cfg, world_size)
    if world_size == 1:
        return Mesh()
    grid = rank_grid(world_size, tp, pp)
    d, p, t = (int(i) for i in (grid == rank).nonzero()[0])
    groups = {}
    # each "axis" group: the ranks that differ only in that coordinate
    for axis, lines in (
        ("tp", grid.reshape(-1, tp)),
        ("pp", grid.permute(0, 2, 1).reshape(-1, pp)),
        ("dp", grid.permute(1, 2, 0).reshape(-1, dp)),
    ):
        for line in lines.tolist():
            group = new_group(cfg, line)
            if rank in line:
                groups[axis] = (group, tuple(line))
    embedding_group = None
    for line in grid.permute(0, 2, 1).reshape(-1, pp).tolist():
        ends = sorted({line[0], line[-1]})
        group = new_group(cfg, ends) if len(ends) > 1 else None
        if rank in ends and rank in line:
            embedding_group = group
    return Mesh(
        world_size=world_size,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=t,
        pp_rank=p,
        dp_rank=d,
        tp_group=groups["tp"][0],
        pp_group=groups["pp"][0],
        dp_group=groups["dp"][0],
        tp_ranks=groups["tp"][1],
        embedding_group=embedding_group,
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
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(
            backend, timeout=collective_timeout(timeout_minutes), rank=rank, world_size=world_size, **kwargs
        )
    return world_size, rank, local_rank


def _first_slurm_host() -> str:
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]
