"""Which global layers each pipeline stage holds, and this rank's stages as models.

Stages are `GPTModel`s holding a contiguous run of global layers. With virtual stages
(interleaved schedule) a rank holds several: rank p holds stages p, p + P, p + 2P, ...
Apart from the schedules (`parallel/pipeline.py`), so that what only lays out the model (the
trainer of an unpipelined run, the planner, the dry run) does not import torch's pipelining.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from megatronlite.config import Config
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel, RunOptions
from megatronlite.parallel.mesh import Mesh

# what torch's allocators say when a tensor cannot be had: out of memory, or more bytes than a size can count
ALLOCATION_FAILURES = ("can't allocate", "Storage size calculation overflowed", "out of memory")


@contextmanager
def model_allocation(cfg: Config, device: torch.device) -> Iterator[None]:
    """Allocating the model on `device`: a model too large for it is the config's to fix, so the allocator's
    failure becomes one line naming the model's size and the device's memory."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not isinstance(e, torch.OutOfMemoryError) and not any(s in str(e) for s in ALLOCATION_FAILURES):
            raise
        from megatronlite.models.counting import parameter_count
        from megatronlite.plan.device_fit import capacity
        from megatronlite.plan.estimate import gib

        m, where = cfg.model, device if device.type == "cuda" else torch.device("cpu")  # meta: sized by the host
        count = parameter_count(m)
        raise UserError(
            f"the model cannot be allocated: {count:,} parameters ({gib(4 * count)} in fp32; "
            f"model.hidden_size {m.hidden_size}, model.num_layers {m.num_layers}, model.vocab_size {m.vocab_size}) "
            f"against {gib(capacity(where, 1))} of {where.type} memory; make the model smaller or split it over "
            "more devices (parallel.tensor, parallel.pipeline)"
        ) from None


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
    with model_allocation(cfg, torch.get_default_device()):  # where the weights are made (meta for a plan)
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
