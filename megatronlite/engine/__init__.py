"""The engine seam: who turns a step's gradients into new weights.

The trainer owns the model, the data, the schedule of micro-batches, the loss and its guards, the learning
rate and the checkpoint files. An engine owns the rest of a step: the gradient reduction over data parallelism,
the gradient norm and clipping, the optimizer and its (possibly sharded, possibly offloaded) states, and what
of those a checkpoint holds, as global pieces of this rank's memory, so that every engine writes and reads the
same layout-free checkpoint. Two implement it (`parallel.engine`): `native` (engine/native.py: megatronlite's
bucketed DP, ZeRO 0-2) and `deepspeed` (engine/deepspeed_zero.py: DeepSpeed's ZeRO 1-3 and offload).
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatronlite.checkpoint.views import GlobalPiece
from megatronlite.config import Config
from megatronlite.parallel.mesh import Mesh


class Engine(Protocol):
    description: str  # the optimizer and engine, as the start-up line prints them
    norm_before_step: bool  # whether `grad_norm` is known before `step` (DeepSpeed: its step computes it)
    skips_on_device: bool  # whether `step(..., skip=flag)` leaves the weights and Adam untouched where flag is set

    def forward(self, model: torch.nn.Module, *inputs: object) -> torch.Tensor:
        """`model(*inputs)`, through whatever the engine wraps around it (DeepSpeed's per-forward bookkeeping)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One micro-batch's backward (`loss` already divided by the micro-batches); `last`: the step's last."""

    def backward_scale(self) -> float:
        """What `backward` multiplies the loss by (DeepSpeed's fp16 loss scale; 1.0 where it scales nothing): a
        gradient that joins outside it (MoE's auxiliary losses, moe.AuxLosses) must carry the same factor."""

    def finish_grads(self) -> None:
        """After the last micro-batch: the reduced gradients are ready for the norm and the step."""

    def grads(self) -> list[torch.Tensor]:
        """The gradients the step applies, in place (fp16's unscale; fault injection), where the engine shows
        them ([] where it keeps them to itself)."""

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (0-dim, on the device): before `step` if `norm_before_step`, else after."""

    def step(self, lr: float, norm: torch.Tensor | None, skip: torch.Tensor | None = None) -> bool:
        """Clip by `norm` (or the engine's own), step at `lr`, make the new weights visible to the model; whether
        the weights moved (DeepSpeed's fp16 skips a step whose scaled gradients overflowed, and lowers its scale).
        `skip` (only where `skips_on_device`): a 0-dim flag on the device; where it is set nothing moves."""

    def zero_grads(self) -> None: ...

    def weight_pieces(self, for_save: bool) -> list[GlobalPiece]:
        """The model weights (`model.*`)."""

    def optimizer_pieces(self, for_save: bool) -> list[GlobalPiece]:
        """Adam's moments (`optim.exp_avg.*`, `optim.exp_avg_sq.*`) of what this rank steps."""

    def weights_loaded(self) -> None:
        """After a load into the weight pieces: whatever the engine derives from them (DeepSpeed: the model's copy of
        its fp32 master weights)."""

    def set_optimizer_steps(self, steps: int) -> None:
        """Adam's step count (its bias correction), after a load into the optimizer pieces."""

    def state_values(self) -> dict:
        """The engine's own small state for meta.json (DeepSpeed's fp16 loss scale), {} where it keeps none."""

    def restore_values(self, meta: dict) -> None:
        """Take back what `state_values` saved (from the whole meta.json)."""


def build_engine(
    cfg: Config, mesh: Mesh, stages: list, late_sync: dict, num_micro: int, device: torch.device
) -> Engine:
    """The engine `parallel.engine` names, over this rank's pipeline stages (their parameters initialised);
    `late_sync`: the gradients summed over other groups before the DP reduction (trainer.late_sync_groups)."""
    if cfg.parallel.engine == "deepspeed":
        from megatronlite.engine.deepspeed_zero import DeepSpeedEngine  # imports deepspeed: only when asked for

        return DeepSpeedEngine(cfg, mesh, stages, late_sync, num_micro, device)
    from megatronlite.engine.native import NativeEngine

    return NativeEngine(cfg, mesh, stages, late_sync, num_micro, device)
