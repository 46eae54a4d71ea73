"""`megatronlite submit`: render an sbatch script from a template and submit it.

The config and the layout are checked here, before anything is queued. The script asks Slurm for
a warning signal before the time limit and may requeue itself: on the warning the trainer saves
and stops, and the requeued job resumes from that checkpoint (templates/slurm_helpers.sh).

The templates are package data (templates/ beside this file), so a plain `pip install` can submit;
a checkout's launch/ links to them, and `--print-template` writes one out for a user to edit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from megatronlite import config
from megatronlite.errors import UserError, made_dir
from megatronlite.launcher import slurmctl
from megatronlite.launcher.template import render

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = {"torchrun": "slurm_torchrun.sbatch", "srun": "slurm_srun.sbatch"}


class _PrintTemplate(argparse.Action):
    """`--print-template LAUNCHER`: print that default template and exit, before the required arguments are
    checked (like --version), so `submit --print-template torchrun > mine.sbatch` needs no config."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str,
        option_string: str | None = None,
    ) -> None:
        print((TEMPLATE_DIR / TEMPLATES[values]).read_text(), end="")
        parser.exit()


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """The resources and launch options of a Slurm job (shared by `submit` and `sweep --executor slurm`)."""
    g = p.add_argument_group("Slurm")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--nproc-per-node", type=int, default=1, help="workers per node (one per GPU)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs to ask for per node (default: --nproc-per-node; 0: none)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per Slurm task")
    g.add_argument("--partition")
    g.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00")
    g.add_argument("--account")
    g.add_argument("--max-restarts", type=int, default=0, help="restart the workers after a failure, up to N times")
    g.add_argument(
        "--launcher",
        choices=sorted(TEMPLATES),
        default="torchrun",
        help="torchrun: one task per node starting torchrun; srun: one task per worker",
    )
    g.add_argument("--template", type=Path, help="your own sbatch template (default: the --launcher's own)")
    g.add_argument(
        "--print-template",
        action=_PrintTemplate,
        choices=sorted(TEMPLATES),
        help="print the default template of a launcher (a start for your own --template) and exit",
    )
    g.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="ask for the save-and-requeue warning this long before the time limit",
    )
    g.add_argument("--container-image", help="run the workers in this image with pyxis/enroot (srun --container-image)")
    g.add_argument("--container-mounts", help="pyxis mounts SRC:DST[,...] besides the working and run directories")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    add_slurm_arguments(p)
    p.add_argument("--job-name", help="default: the config's name")
    p.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and report its final state")


@dataclass
class Job:
    """What one sbatch script runs: `run` is shell that sets RUN_DIR and CONFIG for each task."""

    name: str
    run: str
    set_args: list[str]
    output: str  # the --output pattern
    array: str | None = None  # an --array spec


_LEAST = {
    "nodes": 1,
    "nproc_per_node": 1,
    "gpus_per_node": 0,
    "cpus_per_task": 1,
    "max_restarts": 0,
    "signal_seconds": 1,
}
_DIRECTIVE_FLAGS = {"chdir": "the working directory", "output": "--run-dir"}  # where a directive's value comes from


def check_resources(args: argparse.Namespace) -> None:
    """Refuse what sbatch would reject, or what would fail only once the job runs (a negative --max-restarts)."""
    for flag, least in _LEAST.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    for flag in ("partition", "time", "account"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UserError(f"--{flag} must not be empty")


def _checked(key: str, value: object) -> str:
    """`--key=value` for an #SBATCH line: a control character (a newline) would end the line and make the rest of
    the value a shell command of the script, and sbatch stops reading directives at it."""
    text = str(value)
    bad = next((c for c in text if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise UserError(f"{_DIRECTIVE_FLAGS.get(key, '--' + key)}: {text!r} has a control character ({bad!r})")
    return f"--{key}={text}"


def _directives(args: argparse.Namespace, job: Job) -> list[str]:
    gpus = args.nproc_per_node if args.gpus_per_node is None else args.gpus_per_node
    tasks = 1 if args.launcher == "torchrun" else args.nproc_per_node
    values = {
        "job-name": job.name,
        "nodes": args.nodes,
        "ntasks-per-node": tasks,
        "gpus-per-node": gpus or None,
        "cpus-per-task": args.cpus_per_task,
        "partition": args.partition,
        "time": args.time,
        "account": args.account,
        "array": job.array,
        "chdir": Path.cwd(),
        "output": job.output,
    }
    out = [_checked(key, value) for key, value in values.items() if value is not None]
    return [
        *out,
        "--open-mode=append",  # a requeued run adds to the same log
        f"--signal=B:USR1@{args.signal_seconds}",
        "--requeue",
    ]


def _srun_options(args: argparse.Namespace, run_root: Path) -> str:
    opts = [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    if args.container_image:
        cwd = Path.cwd()
        mounts = [f"{d}:{d}" for d in dict.fromkeys([cwd, run_root])]
        if args.container_mounts:
            mounts.append(args.container_mounts)
        opts += [
            f"--container-image={args.container_image}",
            f"--container-mounts={','.join(mounts)}",
            f"--container-workdir={cwd}",
        ]
    return " ".join(shlex.quote(o) for o in opts)


def render_script(args: argparse.Namespace, job: Job, run_root: Path) -> str:
    """The sbatch script for `job`, from the template, with this machine's python (or the image's)."""
    template = args.template or TEMPLATE_DIR / TEMPLATES[args.launcher]
    helpers = TEMPLATE_DIR / "slurm_helpers.sh"
    python = "python" if args.container_image else shlex.quote(sys.executable)
    values = {
        "sbatch": "\n".join(f"#SBATCH {shlex.quote(d)}" for d in _directives(args, job)),
        "helpers": helpers.read_text().rstrip(),
        "run": job.run,
        "megatronlite": f"{python} -m megatronlite",
        "set_args": " ".join(f"--set {shlex.quote(s)}" for s in job.set_args),
        "nproc_per_node": str(args.nproc_per_node),
        "max_restarts": str(args.max_restarts),
        "srun_options": _srun_options(args, run_root),
    }
    return render(template, values)


def _report(records: list[dict[str, str]], run_dir: Path, log: Path) -> None:
    """Print where the results are; exit 1 (after the log's tail) unless every job completed."""
    failed = [r for r in records if r.get("JobState") != "COMPLETED"]
    print(f"run directory: {run_dir}")
    if not failed:
        return
    for r in failed:
        print(f"megatronlite: job {slurmctl.describe(r)}", file=sys.stderr)
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- last lines of {log}:", *tail, sep="\n", file=sys.stderr)
    sys.exit(1)


def main(args: argparse.Namespace) -> None:
    check_resources(args)
    cfg = config.load(args.config, args.set)
    config.validate_layout(cfg, args.nodes * args.nproc_per_node)
    run_dir = config.run_dir(cfg, args.run_dir).resolve()
    job = Job(
        name=args.job_name or cfg.name,
        run=f"RUN_DIR={shlex.quote(str(run_dir))}\nCONFIG={shlex.quote(os.path.abspath(args.config))}",
        set_args=args.set,
        output=str(run_dir / "slurm-%j.out"),
    )
    script = render_script(args, job, run_dir)
    if args.dry_run:
        print(script, end="")
        return
    path = made_dir(run_dir, "--run-dir") / "slurm_job.sbatch"
    path.write_text(script)
    job_id = slurmctl.sbatch(path)
    log = run_dir / f"slurm-{job_id}.out"
    print(f"submitted job {job_id}: {cfg.name} on {args.nodes} node(s) x {args.nproc_per_node}; log {log}", flush=True)
    if args.wait:
        _report(slurmctl.wait(job_id), run_dir, log)
