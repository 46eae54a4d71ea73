"""A sweep's summary: one row per trial (parameters, status, final and best eval loss, tokens/s) as
CSV and Markdown, and a PNG of every trial's loss curve. Built from the run directories alone, so it
can be rebuilt at any time (`megatronlite sweep SWEEP.yaml --report`)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from megatronlite.checkpoint.names import META, latest_named, step_of
from megatronlite.config import Config
from megatronlite.curves import draw, read_metrics
from megatronlite.launcher.sweep_spec import Sweep


def saved_step(run_dir: Path) -> int:
    """The step of the run's latest committed checkpoint (`checkpoints/latest` names it; its meta.json is written
    last); 0 when there is none, or `latest` is unreadable."""
    latest = latest_named(run_dir / "checkpoints")
    return step_of(latest) if latest is not None and (latest / META).is_file() else 0


def reached_step(run_dir: Path, cfg: Config) -> int:
    """How far a run got that a re-run keeps: its latest checkpoint when it saves them (a run resumes from there,
    so steps logged after it, as by a run killed in its final save, are redone), else its last logged step."""
    if cfg.checkpoint.save:
        return saved_step(run_dir)
    metrics = read_metrics(run_dir)
    return metrics[-1]["step"] if metrics else 0


def done(run_dir: Path, cfg: Config) -> bool:
    return reached_step(run_dir, cfg) >= cfg.train.steps


def _row(trial_dir: Path, cfg: Config) -> dict:
    metrics = read_metrics(trial_dir)
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    reached, steps = reached_step(trial_dir, cfg), cfg.train.steps
    speeds = [m["tokens_per_sec"] for m in metrics if m.get("tokens_per_sec")]
    return {
        "status": "done" if reached >= steps else f"{reached}/{steps}" if reached or metrics else "not run",
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
    }


def summarize(sweep: Sweep, out: Path, configs: dict[str, Config]) -> list[dict]:
    return [
        {"trial": t.id, **{k: t.params.get(k) for k in sweep.param_keys}, **_row(out / t.id, configs[t.id])}
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


def write(sweep: Sweep, out: Path, configs: dict[str, Config]) -> str:
    """Write summary.csv, summary.md and loss.png under `out` (the trials' parent); return the Markdown table.

    `configs` is each trial's resolved config, by trial id.
    """
    rows = summarize(sweep, out, configs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (out / "summary.md").write_text(f"# Sweep {sweep.name}\n\n{table}\n![loss curves](loss.png)\n")
    plot(sweep, out, out / "loss.png")
    return table
