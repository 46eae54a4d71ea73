"""`plan --calibrate RUN_DIR`: fit the matmul efficiency so the planner predicts a finished run's step time.

A run directory holds the resolved config and `metrics.jsonl`. The efficiency is the one at which
the planner's step time for the run's layout equals the measured one (the median logged tokens/s,
the first logged step left out as warm-up). The result is stored per GPU type in
hardware.CALIBRATION_FILE, which the planner reads. After it, the planner's MFU for that run's layout
is the run's own (both are model FLOPs over the peak).
"""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

from megatronlite import config
from megatronlite.errors import UserError
from megatronlite.plan import hardware
from megatronlite.plan.estimate import Planner
from megatronlite.plan.layout import layout_of


def measured_tokens_per_sec(run_dir: Path) -> float:
    """The median logged tokens/s of a run, its first logged step (compilation, warm-up) left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (calibrate from a run directory that logged steps)")
    rates = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {n}: not JSON") from None
        if isinstance(record.get("tokens_per_sec"), (int, float)):
            rates.append(float(record["tokens_per_sec"]))
    if len(rates) < 2:
        raise UserError(f"{path}: {len(rates)} logged steps with tokens_per_sec; calibration needs at least 2")
    return statistics.median(rates[1:])


def fit(run_dir: Path, gpus: int, gpus_per_node: int, hw: hardware.GPU) -> float:
    """The efficiency at which the planner predicts the run's measured step time on `gpus` devices `hw`.

    The predicted step time falls as the efficiency rises (compute and the bubble shrink, and with them
    the overlap that hides DP's reduction), so the efficiency is found by bisection on (0, 1]."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found (a run directory holds the config.yaml it ran with)")
    cfg = config.from_dict(config.load_raw(path))
    layout = layout_of(cfg, gpus)

    def step(efficiency: float) -> float:
        return Planner(cfg, gpus, gpus_per_node, hw, efficiency).estimate(layout).time.total

    measured = cfg.train.global_batch_size * cfg.train.seq_len / measured_tokens_per_sec(run_dir)
    if measured < step(1.0):
        raise UserError(
            f"{run_dir}: a measured step of {measured:.3g} s is faster than these {gpus} devices at their peak "
            f"({step(1.0):.3g} s predicted): it is not explained; check --gpus and --gpu"
        )
    low, high = 1e-6, 1.0
    for _ in range(100):  # the step time is monotone in the efficiency
        middle = (low + high) / 2
        low, high = (middle, high) if step(middle) > measured else (low, middle)
    return (low + high) / 2


def store(kind: str, efficiency: float, run_dir: Path, path: Path | None = None) -> None:
    """Record the fitted efficiency for `kind` (other GPU types' entries stay)."""
    path = path or hardware.CALIBRATION_FILE
    entries = json.loads(path.read_text()) if path.is_file() else {}
    entries[kind] = {"efficiency": efficiency, "run": str(run_dir), "date": str(datetime.date.today())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
