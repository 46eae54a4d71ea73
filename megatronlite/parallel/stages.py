"""Which global layers each pipeline stage holds, and this rank's stages as models.

Stages are `GPTModel`s holding a contiguous run of global layers. With virtual stages
(interleaved schedule) a rank holds several: rank p holds stages p, p + P, p + 2P, ...
Apart from the schedules (`parallel/pipeline.py`), so that what only lays out the model (the
trainer of an unpipelined run, the planner, the dry run) does not import torch's pipelining.
"""

from __future__ import annotations

from typing import NamedTuple

from megatronlite.config import Config
from megatronlite.models.gpt import GPTModel, RunOptions
from megatronlite.parallel.mesh import Mesh


def stage_layers(cfg: Config) -> list[list[int]]:
    """The global layer ids of every pipeline stage (P x virtual stages), in stage order."""
    p = cfg.parallel
    n_stages = p.pipeline * p.virtual_pipeline
    counts = p.pipeline_layers or [cfg.model.num_layers // n_stages] * n_stages
    out, start = [], 0
    for count in counts:
        out.append(list(range(start, start + count)))
        start += count
    return out


class Stage(NamedTuple):
    index: int  # in pipeline order, over all P x virtual stages
    model: GPTModel


def build_stages(cfg: Config, mesh: Mesh, options: RunOptions) -> list[Stage]:
    """This rank's stages (one, or with virtual stages p, p + P, p + 2P, ...)."""
    layers = stage_layers(cfg)
    n_stages = len(layers)
    out = []
    for stage_index in range(mesh.pp_rank, n_stages, mesh.pp):
        model = GPTModel(
            cfg.model,
            mesh,
            layer_ids=layers[stage_index],
            pre_process=stage_index == 0,
            post_process=stage_index == n_stages - 1,
            options=options,
        )
        out.append(Stage(stage_index, model))
    return out
