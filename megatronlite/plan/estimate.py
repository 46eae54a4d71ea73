"""One layout's prediction (worst rank's memory, step time, tokens/s, MFU), and every layout's, best first."""

from __future__ import annotations

from dataclasses import dataclass

from megatronlite import kernels
from megatronlite.config import Config, micro_batches
from megatronlite.models.counting import flops_per_token
from megatronlite.models.gpt import RunOptions
from megatronlite.plan.hardware import GPU
from megatronlite.plan.layout import Layout, apply, layouts
from megatronlite.plan.memory import Memory, ModelStates, model_states, stage_memories, stage_rank
from megatronlite.plan.steptime import StepTime, step_time


def gpu_options(cfg: Config) -> RunOptions:
    """How a run of `cfg` executes on a GPU with Triton installed (train.kernels auto): the fused SwiGLU and the
    chunked output layer + loss, unless the config names other kernels or masks the loss."""
    choices = cfg.train.kernels
    chosen = {op: (choices.get(op, "auto") if isinstance(choices, dict) else choices) for op in kernels.OPS}
    resolved = {op: "triton" if impl == "auto" else impl for op, impl in chosen.items()}
    return RunOptions(
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.train.recompute,
        recompute_layers=cfg.train.recompute_layers,
        kernels=resolved,
        fused_cross_entropy=resolved["linear_cross_entropy"] != "torch" and not cfg.data.eod_mask_loss,
    )


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: Memory  # of the heaviest rank
    stage: int  # the pipeline stage of that rank
    time: StepTime
    tokens_per_sec: float
    mfu: float
    capacity: float  # bytes per GPU

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    def overflow(self) -> str:
        """What does not fit: the excess and the largest parts."""
        parts = sorted(self.memory.parts().items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{name} {gib(b)}" for name, b in parts)
        return f"needs {gib(self.memory.total)} of {gib(self.capacity)} (largest: {top})"


def gib(n: float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


class Planner:
    """Predictions for one config on one GPU type; model states are built once per distinct sharding."""

    def __init__(self, cfg: Config, gpus: int, gpus_per_node: int, hw: GPU, efficiency: float) -> None:
        self.cfg, self.gpus, self.gpus_per_node, self.hw, self.efficiency = cfg, gpus, gpus_per_node, hw, efficiency
        self._states: dict[tuple, ModelStates] = {}

    def _model_states(self, cfg: Config, layout: Layout, stage: int) -> ModelStates:
        """Built once per sharding: micro-batch size and recompute do not change what is allocated."""
        key = (layout.tp, layout.pp, layout.vp, layout.cp, layout.dp, layout.zero, layout.sequence_parallel, layout.ep)
        key += (stage,)
        if key not in self._states:
            self._states[key] = model_states(cfg, self.gpus, stage_rank(cfg, self.gpus, stage))
        return self._states[key]

    def estimate(self, layout: Layout) -> Estimate:
        cfg = apply(self.cfg, layout)
        n_micro = micro_batches(cfg.train, layout.dp)
        mems = stage_memories(cfg, n_micro, gpu_options(cfg), lambda s: self._model_states(cfg, layout, s))
        worst = max(mems, key=lambda s: mems[s].total)
        weights = max(m.weights for m in mems.values())
        time = step_time(cfg, self.gpus, self.gpus_per_node, self.hw, self.efficiency, weights)
        tokens_per_sec = cfg.train.global_batch_size * cfg.train.seq_len / time.total
        mfu = tokens_per_sec / self.gpus * flops_per_token(cfg.model, cfg.train.seq_len) / self.hw.peak_flops
        return Estimate(layout, mems[worst], worst, time, tokens_per_sec, mfu, self.hw.memory)

    def all(self) -> list[Estimate]:
        """Every legal layout, those that fit first, each group fastest first (then the least memory)."""
        out = [self.estimate(layout) for layout in layouts(self.cfg, self.gpus, self.gpus_per_node)]
        return sorted(out, key=lambda e: (not e.fits, -e.tokens_per_sec, e.memory.total))


def why_better(best: Estimate, other: Estimate) -> str:
    """One line: how much faster `best` is than `other` and the step-time parts that differ most."""
    diffs = {k: other.time.parts()[k] - v for k, v in best.time.parts().items()}
    top = sorted(diffs.items(), key=lambda kv: -abs(kv[1]))[:2]
    said = ", ".join(f"{k} {'-' if d > 0 else '+'}{abs(d) * 1e3:.1f} ms" for k, d in top if d)
    speed = best.tokens_per_sec / other.tokens_per_sec - 1
    if not said:
        return f"{best.layout.name()} ties {other.layout.name()} on time and uses {gib(best.memory.total)}"
    return f"{best.layout.name()} is {100 * speed:.1f}% faster than {other.layout.name()}: {said} per step"
