"""Runs' metrics as pictures: `megatronlite plot RUN [RUN...] [--metric loss,eval_loss,tokens_per_sec] -o PNG`.

Reads each run directory's metrics.jsonl (a step logged again after a resume keeps its newest
record) and draws one panel per quantity, one line per run: `loss` and `eval_loss` share the loss
panel (eval dashed, with dots), every other metric has its own. The sweep report draws its
loss.png with the same function.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from types import ModuleType

from megatronlite.errors import UserError
from megatronlite.extras import require

LOSS_PANEL = ("loss", "eval_loss")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl by step; a step logged again after a resume keeps its newest record."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def pyplot(what: str) -> ModuleType:
    """matplotlib's pyplot, drawing to files only; without matplotlib, a UserError naming the extra."""
    require("matplotlib", "sweep", what).use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def panels(metrics: list[str]) -> list[list[str]]:
    """The metrics grouped into panels, in the order asked: the losses together, the rest one each."""
    out: list[list[str]] = []
    for metric in metrics:
        shared = next((p for p in out if metric in LOSS_PANEL and p[0] in LOSS_PANEL), None)
        if shared is None:
            out.append([metric])
        else:
            shared.append(metric)
    return out


def draw(runs: list[tuple[str, list[dict]]], metrics: list[str], path: Path, title: str, what: str) -> None:
    """One panel per group of `metrics`, one line per (label, records) run; a run lacking a metric has no line."""
    plt = pyplot(what)
    groups = panels(metrics)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 + 2.3 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        for label, records in runs:
            color = None
            for i, metric in enumerate(group):
                points = [(r["step"], r[metric]) for r in records if r.get(metric) is not None]
                if not points:
                    continue
                style = {"linewidth": 1.2} if i == 0 else {"linestyle": "--", "marker": "o", "markersize": 3}
                name = label if i == 0 or color is None else None
                (line,) = ax.plot(*zip(*points), color=color, label=name, **style)
                color = line.get_color()
        ax.set(xlabel="step", ylabel=" / ".join(group) + (" (dashed)" if len(group) > 1 else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with a metrics.jsonl)")
    parser.add_argument(
        "--metric", help="comma-separated metrics.jsonl keys (default: loss, and eval_loss where a run logged it)"
    )
    parser.add_argument("-o", "--output", default="curves.png", help="the PNG to write (default: curves.png)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    metrics = [m.strip() for m in (args.metric or "").split(",") if m.strip()]
    if args.metric is not None and not metrics:
        raise UserError("--metric: name at least one metrics.jsonl key, e.g. loss,eval_loss,tokens_per_sec")
    runs = []
    for run in map(Path, args.runs):
        records = read_metrics(run)
        if not records:
            raise UserError(f"{run}: no metrics.jsonl with records (expected a run directory)")
        runs.append((run.name if run.name else str(run), records))
    logged = {key for _, records in runs for r in records for key in r}
    metrics = metrics or [m for m in LOSS_PANEL if m in logged]
    missing = [m for m in metrics if m not in logged]
    if missing:
        known = ", ".join(sorted(logged - {"step"}))
        raise UserError(f"--metric {','.join(missing)}: not in any run's metrics.jsonl; logged keys: {known}")
    draw(runs, metrics, Path(args.output), " vs ".join(label for label, _ in runs), "megatronlite plot")
    print(f"wrote {args.output}: {', '.join(metrics)} of {len(runs)} run(s)")
