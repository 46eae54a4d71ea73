"""Pipeline parallelism's schedules: each step's micro-batches through this rank's stages (`parallel/stages.py`).

The schedules are torch.distributed.pipelining's (1F1B, interleaved 1F1B, GPipe, zero bubble), which
compose with our TP layers because each TP rank of a stage runs the same schedule and talks
to the same TP rank of the neighbouring stage over the PP group. Only pipelined runs import this
module (torch's pipelining adds about half a second to a worker's start).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from megatronlite.models.gpt import GPTModel, Packing
from megatronlite.models.moe import uncounted
from megatronlite.parallel.mesh import Mesh
from megatronlite.parallel.stages import Stage


class _StageHidden(nn.Module):
    """The stage as torch's pipelining sees it: hidden states in and out; the last stage's loss function
    (`GPTModel.loss`, through the trainer) takes its normed output.

    Packed samples (data.document_mask): every pipeline rank holds the step's tokens, so each stage takes the
    documents and positions of the micro-batch it runs from `packing` (set by the runner each step) rather
    than receiving them with the hidden states: torch 2.11's stages give every received tensor a gradient,
    and integer ones cannot have one."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.model = model
        self.packing: list[Packing] | None = None  # this step's micro-batches' documents, or none
        self.micro_batch = 0  # the one the schedule runs now (set by `_Stage.forward_one_chunk`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(x, self.packing[self.micro_batch] if self.packing else None)


class _Stage(PipelineStage):
    """torch's stage, telling its module which micro-batch it runs; its shape inference (torch >= 2.13 runs
    the stage once on placeholder values on the first step) marked as no training forward, so the MoE layers
    do not count its routing."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self.submod.micro_batch = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def _forward_metadata_inference(self, *args, **kwargs):
        with uncounted():
            return super()._forward_metadata_inference(*args, **kwargs)


class PipelineRunner:
    """Runs one step's micro-batches through this rank's stages with the configured schedule."""

    def __init__(
        self,
        stages: list[Stage],
        n_stages: int,
        mesh: Mesh,
        schedule: str,
        n_micro: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self.mesh, self.n_micro = mesh, n_micro
        self.stage_modules = [_StageHidden(model) for _, model in stages]
        pipe_stages = [
            _Stage(module, index, n_stages, device, group=mesh.role("pipeline").pg)
            for (index, _), module in zip(stages, self.stage_modules)
        ]
        self.has_first = any(index == 0 for index, _ in stages)
        self.has_last = any(index == n_stages - 1 for index, _ in stages)
        # grads are not rescaled by the schedule: loss_fn already divides by the micro-batch count,
        # and the DP hooks may be reducing gradients while the schedule finishes
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, n_micro, loss_fn=loss_fn, scale_grads=False)
        elif schedule == "zero_bubble":
            self.schedule = ScheduleInterleavedZeroBubble(pipe_stages, n_micro, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(pipe_stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)

    def run(
        self, inputs: torch.Tensor, labels: torch.Tensor, train: bool, packing: Packing | None = None
    ) -> torch.Tensor | None:
        """Forward (and backward if `train`) the whole batch; the sum of micro-batch losses on the last stage."""
        losses: list[torch.Tensor] = []
        split = None
        if packing is not None:  # the batch's micro-batches, as torch's schedules split the inputs
            documents, positions = (t.tensor_split(self.n_micro) for t in (packing.documents, packing.positions))
            split = [Packing(d, p) for d, p in zip(documents, positions)]
        for module in self.stage_modules:
            module.packing = split
        # contiguous: torch >= 2.11 checks each micro-batch's strides against a contiguous example,
        # and the callers' inputs are views of [batch, seq + 1] token blocks
        args = (inputs.contiguous(),) if self.has_first else ()
        kwargs = {"target": labels, "losses": losses} if self.has_last else {}
        (self.schedule.step if train else self.schedule.eval)(*args, **kwargs)
        return torch.stack([loss.detach() for loss in losses]).sum() if self.has_last else None
