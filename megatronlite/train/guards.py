"""Guards on a step's numbers: a non-finite loss or gradient, or a loss spike, never trains on silently.

`train.on_nonfinite: stop` (default) ends the run at the first step whose loss or gradients are not
finite, before the optimizer touches the weights, so no checkpoint holds the bad state; `skip` drops
such steps (counted in metrics as `nonfinite_skipped`) and stops after `train.max_skipped_steps` in a
row. fp16's loss scaler keeps its own rule (halve and skip) and stops after that many overflows in a
row at its minimum scale. `train.loss_spike_factor: F` (0: off) treats a loss above F x the mean of
the last `SPIKE_WINDOW` losses as a spike: `train.on_loss_spike: stop`, or `rewind` to the last
checkpoint and go on past the batches that caused it, as large runs do.

Where the optimizer can skip a step on the device (torch's fused AdamW), no step waits for the host: a bad
step's update is skipped there, and the guards see it at the next read of the numbers (a logged step or a
checkpoint, trainer.settle), which stops the run before any checkpoint is written, or counts the skip.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from megatronlite.errors import UserError

SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5


class TrainingStopped(UserError):
    """The run stopped on a guard: one line for the user, exit 2, no checkpoint of the bad state."""


def local_flags(loss: torch.Tensor, grads_finite: torch.Tensor) -> torch.Tensor:
    """[loss non-finite here, gradients non-finite here] of this rank, on the device (no host sync)."""
    return torch.stack([(~torch.isfinite(loss).all()).float(), (~grads_finite).float()])


def grads_finite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether all of `grads` are finite, as a 0-dim flag on the device."""
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def bad_ranks(local: torch.Tensor) -> str:
    """(Every rank, only once a step is known bad.) Which ranks saw a non-finite loss or gradient, from each
    rank's `local_flags`."""
    if not dist.is_initialized():
        flags = [local]
    else:
        flags = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, local)
    parts = []
    for i, what in enumerate(("loss", "gradients")):
        ranks = [str(r) for r, f in enumerate(flags) if f[i] > 0]
        if ranks:
            parts.append(f"{what} on rank(s) {', '.join(ranks)}")
    return "; ".join(parts) or "no rank holds a non-finite value locally (a reduction overflowed)"


class LossSpike(Exception):
    """A spike with `train.on_loss_spike: rewind`: the trainer goes back to its last checkpoint."""


class SkipBudget:
    """Counts guarded skips in a row; past the limit the run stops."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_row = limit, 0

    def skipped(self, step: int, why: str) -> None:
        self.in_row += 1
        if self.in_row > self.limit:
            raise TrainingStopped(
                f"step {step}: {self.in_row} steps in a row skipped ({why}); stopping (train.max_skipped_steps = "
                f"{self.limit}); lower optim.lr or set optim.clip_grad"
            )

    def ok(self) -> None:
        self.in_row = 0


class RewindBudget:
    """Counts loss-spike rewinds until the run gets past the furthest step a spike sent it back from; past the limit
    the run stops (a spike that skipping the data does not cure would send it back for ever)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.furthest = limit, 0, 0

    def rewound(self, step: int, spike: str) -> None:
        self.count = self.count + 1 if step <= self.furthest else 1
        self.furthest = max(self.furthest, step)
        if self.count > self.limit:
            raise TrainingStopped(
                f"{spike}; {self.count} rewinds without getting past step {self.furthest}; stopping "
                f"(train.max_skipped_steps = {self.limit}); lower optim.lr or set optim.clip_grad"
            )


class SpikeDetector:
    """A loss above `factor` x the mean of the recent finite losses is a spike (factor 0: never)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        if len(self.recent) >= SPIKE_MIN_HISTORY and loss > self.factor * (sum(self.recent) / len(self.recent)):
            return True
        self.recent.append(loss)
        return False

    def reference(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))
