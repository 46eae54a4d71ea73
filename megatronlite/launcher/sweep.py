"""`megatronlite sweep`: run every trial of a sweep file, here or as a Slurm job array, then report.

Each trial trains from its own resolved config in its own run directory, OUT/<trial id>/ (OUT is
runs/sweeps/<name> by default). A trial whose final checkpoint is written (with checkpoint.save off: that
logged its last step) is skipped, and an unfinished one resumes from its checkpoint, so re-running a sweep only
does what is left. Stopping the sweep (Ctrl-C, SIGTERM) stops its running trials, which save as they stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from megatronlite import config, curves
from megatronlite.errors import UserError, made_dir
from megatronlite.launcher import slurm, slurmctl, sweep_report, sweep_spec
from megatronlite.launcher.sweep_spec import Sweep, Trial


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--max-parallel", type=int, default=1, help="trials running at once (processes or array tasks)")
    p.add_argument("--out", help="the sweep's directory (default runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the trials (and print the job script for slurm)")
    p.add_argument("--report", action="store_true", help="only write the summary of what has run so far")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the job array, then report")
    slurm.add_slurm_arguments(p)


GRACE_S = 30.0  # for a stopped trial to save its checkpoint and end (a trainer's first SIGTERM: save and stop)


def _terminated(signum: int, frame: object) -> NoReturn:
    """SIGTERM to the sweep (`kill`, a scheduler): end as Ctrl-C would, through the `finally` that stops the trials
    (by default the process would just vanish, leaving its trials running and holding their run directories)."""
    raise SystemExit(128 + signum)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each trial's process group, then SIGKILL the groups still there after GRACE_S."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_local(trials: list[Trial], out: Path, max_parallel: int) -> None:
    """Train the trials as `megatronlite train` processes, `max_parallel` at a time.

    Each trial runs in a session of its own, so that the sweep stopping (an error, Ctrl-C, SIGTERM) stops all of
    it, and a terminal's Ctrl-C reaches the sweep alone, which then stops its trials the same way."""
    env = dict(os.environ)
    if max_parallel > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max_parallel))
    queue, running = list(trials), {}
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                trial = queue.pop(0)
                run_dir = out / trial.id
                cmd = [sys.executable, "-m", "megatronlite", "train", str(run_dir / "config.yaml")]
                with open(run_dir / "train.log", "a") as log:
                    running[trial.id] = subprocess.Popen(
                        [*cmd, "--run-dir", str(run_dir)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                print(f"trial {trial.id}: started {trial.params}", flush=True)
            for tid, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[tid]
                if proc.returncode == 0:
                    print(f"trial {tid}: done", flush=True)
                else:
                    print(f"trial {tid}: failed with exit code {proc.returncode}; see {out / tid / 'train.log'}")
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stopping short
        if running:
            with contextlib.suppress(OSError):  # stderr may be a pipe whose reader has gone: stop the trials still
                print(f"sweep: stopping {len(running)} running trial(s): {', '.join(running)}", file=sys.stderr)
        _stop(list(running.values()))
        signal.signal(signal.SIGTERM, previous)


def _array_script(args: argparse.Namespace, sweep: Sweep, trials: list[Trial], out: Path) -> tuple[str, str]:
    """Render the job array script for `trials` (task i trains trials[i]); return (script, log pattern)."""
    dirs = " ".join(shlex.quote(str(out / t.id)) for t in trials)
    job = slurm.Job(
        name=sweep.name,
        run=f'TRIALS=({dirs})\nRUN_DIR=${{TRIALS[$SLURM_ARRAY_TASK_ID]}}\nCONFIG="$RUN_DIR/config.yaml"',
        set_args=[],
        output=str(out / "logs" / "slurm-%A_%a.out"),
        array=f"0-{len(trials) - 1}%{args.max_parallel}",
    )
    return slurm.render_script(args, job, out), job.output


def _report(sweep: Sweep, out: Path, configs: dict[str, config.Config]) -> None:
    print(sweep_report.write(sweep, out, configs), end="")
    print(f"summary: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'loss.png'}")


def _layout_world(args: argparse.Namespace) -> int:
    return args.nodes * args.nproc_per_node if args.executor == "slurm" else 1


def main(args: argparse.Namespace) -> None:
    if args.max_parallel < 1:
        raise UserError(f"--max-parallel must be >= 1, got {args.max_parallel}")
    if args.executor == "slurm":
        slurm.check_resources(args)
    sweep = sweep_spec.load(args.sweep_file)
    out = Path(args.out or Path("runs") / "sweeps" / sweep.name).resolve()
    configs = {t.id: sweep_spec.resolve_config(sweep, t) for t in sweep.trials}
    if args.report:
        _report(sweep, out, configs)
        return
    for trial in sweep.trials:
        try:
            config.validate_layout(configs[trial.id], _layout_world(args))
        except UserError as e:
            raise UserError(f"sweep {sweep.name}, trial {trial.id}: {e}") from None
    todo = [t for t in sweep.trials if not sweep_report.done(out / t.id, configs[t.id])]
    print(f"sweep {sweep.name}: {len(sweep.trials)} trial(s), {len(sweep.trials) - len(todo)} already done; in {out}")
    if args.dry_run:
        for t in sweep.trials:
            print(f"  {t.id}  {'to run' if t in todo else 'done  '}  {' '.join(t.overrides())}")
        if args.executor == "slurm" and todo:
            print(_array_script(args, sweep, todo, out)[0], end="")
        return
    curves.pyplot(sweep_report.PLOT)  # the report at the end plots: refuse now, not after the trials have trained
    made_dir(out, "sweep --out")
    for t in todo:
        made_dir(out / t.id, "sweep trial directory")
        config.save(configs[t.id], out / t.id / "config.yaml")
    if args.executor == "slurm" and todo:
        script, log = _array_script(args, sweep, todo, out)
        (out / "logs").mkdir(exist_ok=True)
        (out / "sweep_array.sbatch").write_text(script)
        job_id = slurmctl.sbatch(out / "sweep_array.sbatch")
        print(f"submitted job array {job_id}: {len(todo)} trial(s), {args.max_parallel} at a time; logs {log}")
        if not args.wait:
            where = f" --out {out}" if args.out else ""
            print(f"when it is done: megatronlite sweep {args.sweep_file}{where} --report")
            return
        slurmctl.wait(job_id)
    else:
        _run_local(todo, out, args.max_parallel)
    _report(sweep, out, configs)
    failed = [t.id for t in todo if not sweep_report.done(out / t.id, configs[t.id])]  # as the report's status
    if failed:
        print(f"megatronlite: {len(failed)} trial(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
