"""A sweep's summary: one row per trial (parameters, status, final and best eval loss, tokens/s) as
CSV and Markdown, and a PNG of every trial's loss curve. Built from the run directories alone, so it
can be rebuilt at any time (`megatronlite sweep SWEEP.yaml --report`)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from megatronlite.curves import draw, read_metrics
from megatronlite.launcher.sweep_spec import Sweep


def finished_step(run_dir: Path) -> int:
    """The furthest step a run reached: its last logged step or its latest checkpoint."""
    metrics = read_metrics(run_dir)
    latest = run_dir / "checkpoints" / "latest"
    saved = int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0
    return max(metrics[-1]["step"] if metrics else 0, saved)


def _row(trial_dir: Path, steps: int) -> dict:
    metrics = read_metrics(trial_dir)
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    reached = finished_step(trial_dir)
    speeds = [m["tokens_per_sec"] for m in metrics if m.get("tokens_per_sec")]
    return {
        "status": "done" if reached >= steps else f"{reached}/{steps}" if reached else "not run",
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
    }


def summarize(sweep: Sweep, out: Path, steps: dict[str, int]) -> list[dict]:
    return [
        {"trial": t.id, **{k: t.params.get(k) for k in sweep.param_keys}, **_row(out / t.id, steps[t.id])}
        for t in sweep.trials
    ]


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PLOT = "a sweep's loss plot (loss.png)"


def plot(sweep: Sweep, out: Path, path: Path) -> None:
    """Training loss (lines) and eval loss (dashed, dots) of every trial against the step."""
    runs = []
    for trial in sweep.trials:
        label = f"{trial.id} " + ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in trial.params.items())
        runs.append((label, read_metrics(out / trial.id)))
    draw(runs, ["loss", "eval_loss"], path, f"sweep {sweep.name}", PLOT)


def write(sweep: Sweep, out: Path, steps: dict[str, int]) -> str:
    """Write summary.csv, summary.md and loss.png under `out` (the trials' parent); return the Markdown table.

    `steps` is each trial's train.steps, by trial id.
    """
    rows = summarize(sweep, out, steps)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (out / "summary.md").write_text(f"# Sweep {sweep.name}\n\n{table}\n![loss curves](loss.png)\n")
    plot(sweep, out, out / "loss.png")
    return table
