"""Dynamic loss scaling for fp16, decided from the global gradient norm.

The norm is already reduced over every rank (TP, PP and, with ZeRO-1, DP), so an overflow
seen anywhere makes every rank skip the same step: no extra collective, no disagreement.
"""

from __future__ import annotations

import math


class LossScaler:
    def __init__(self, initial: float, growth_interval: int = 1000, min_scale: float = 1.0) -> None:
        self.scale, self.growth_interval, self.min_scale = initial, growth_interval, min_scale
        self.good_steps = 0
        self.skipped = 0  # steps skipped for overflow since the run started

    def update(self, grad_norm: float) -> bool:
        """Record this step's (unscaled) gradient norm; return False when the step must be skipped."""
        if not math.isfinite(grad_norm):
            self.scale = max(self.min_scale, self.scale / 2)
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state.get("skipped", 0)


def from_deepspeed(fields: dict, skipped: int) -> dict:
    """DeepSpeed's DynamicLossScaler state (`cur_scale`, `cur_iter`, `last_overflow_iter`) as this scaler's: a run
    moved from the DeepSpeed engine to the native one goes on at the scale and in the growth window it reached."""
    stable = int(fields["cur_iter"]) - int(fields["last_overflow_iter"]) - 1  # good steps since the last overflow
    return {"scale": float(fields["cur_scale"]), "good_steps": max(0, stable), "skipped": skipped}


def to_deepspeed(state: dict, cur_iter: int) -> dict:
    """This scaler's state as DeepSpeed's (`from_deepspeed` the other way), for a scaler at its step `cur_iter`."""
    return {"cur_scale": float(state["scale"]), "last_overflow_iter": cur_iter - int(state["good_steps"]) - 1}
