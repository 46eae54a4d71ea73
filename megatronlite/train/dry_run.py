"""`megatronlite train CONFIG --dry-run`: every check a run makes before its first step, and nothing else.

No process group is made, no tensor is allocated (models are built on the meta device) and nothing in the
run directory is written; the data's index caches are built or found, as `megatronlite data prebuild` does,
since reading the data is one of the checks. The first check that fails raises the same one-line error the
run would; when all pass, the resolved config is printed as the run would write it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import model_pieces
from megatronlite.config import Config
from megatronlite.data.run import build_run_data, describe
from megatronlite.models.gpt import RunOptions
from megatronlite.parallel.stages import build_stages
from megatronlite.plan.device_fit import memory_report
from megatronlite.plan.layout import layout_of, mesh_at
from megatronlite.plan.memory import stage_rank
from megatronlite.train import checkpointing
from megatronlite.train.run_lock import held_by, in_use
from megatronlite.train.trainer import run_options


def model_shapes(cfg: Config, world_size: int, options: RunOptions) -> dict[str, tuple[int, ...]]:
    """The global shape of every stored weight of `cfg`'s model, over all pipeline stages (built on meta)."""
    shapes = {}
    for pp_rank in range(cfg.parallel.pipeline):
        mesh = mesh_at(cfg, world_size, stage_rank(cfg, world_size, pp_rank))
        with torch.device("meta"):
            stages = build_stages(cfg, mesh, options)
        params = {n: p for _, model in stages for n, p in model.named_parameters()}
        shapes.update({p.key: p.global_shape for p in model_pieces(params, mesh, for_save=False)})
    return shapes


def checkpoint_line(cfg: Config, run_dir: Path, world_size: int, options: RunOptions) -> str:
    """Where the run would start from; a checkpoint whose weights do not fit the model is refused now."""
    step_dir = checkpointing.resolve_load(cfg, run_dir)
    if step_dir is None:
        return f"start: step 0 (checkpoint.load = {cfg.checkpoint.load}, no checkpoint to resume)"
    meta = store.read_meta(step_dir)
    warning = checkpointing.verify(cfg, step_dir, meta, model_shapes(cfg, world_size, options))
    kind = "weights only" if meta.get("weights_only") else f"step {meta.get('step')}"
    line = f"start: {step_dir} ({kind}; its weights match the model)"
    return line + (f"\n{warning}" if warning else "")


def dry_run(
    cfg: Config, run_dir: Path, world_size: int, device: torch.device, workers_here: int
) -> tuple[list[str], bool]:
    """(the report of a run of `cfg` on `world_size` workers, `workers_here` on this node, that was not started;
    whether it is predicted to fit the devices' memory)."""
    layout = layout_of(cfg, world_size)  # validates the layout for this world size
    holder = held_by(run_dir)
    if holder is not None:
        raise in_use(run_dir, holder)
    options = run_options(cfg, device)  # resolves the kernels: a missing backend fails here, as in the run
    lines = [f"layout: {layout.name()} on {world_size} worker(s), device {device.type}"]
    memory, fits = memory_report(cfg, world_size, options, device, workers_here)
    lines.append(memory)
    lines.append(checkpoint_line(cfg, run_dir, world_size, options))
    lines += ["data: " + line for line in describe(build_run_data(cfg))]
    lines.append(f"run directory: {run_dir} (nothing written)")
    lines += ["resolved config:", config_mod.to_yaml(cfg).rstrip()]
    return lines, fits
