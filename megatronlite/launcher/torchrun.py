"""`megatronlite launch`: validate the config for the whole job, then start its workers with torchrun.

Checking the config and the TP x PP x DP layout here means a bad value is reported once, before
any worker starts. When a worker dies, torchrun stops the others; we report which rank failed
and its error in one line instead of torchrun's report.
"""

from __future__ import annotations

import argparse
import sys

from megatronlite import config
from megatronlite.errors import UserError
from megatronlite.train.preemption import EXIT_CODE as PREEMPTED


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--nproc-per-node", type=int, required=True, help="workers on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (c10d rendezvous when given, e.g. a Slurm job id)")


def torchrun_args(args: argparse.Namespace) -> list[str]:
    out = [f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}"]
    if args.rdzv_id is not None:
        out += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
            f"--rdzv-id={args.rdzv_id}",
        ]
    else:
        out += [
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
        ]
    out += ["-m", "megatronlite", "train", args.config]
    if args.run_dir:
        out += ["--run-dir", args.run_dir]
    for item in args.set:
        out += ["--set", item]
    return out


def main(args: argparse.Namespace) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be >= 1")
    cfg = config.load(args.config, args.set)
    config.validate_layout(cfg, args.nproc_per_node * args.nnodes)
    try:
        run(get_args_parser().parse_args(torchrun_args(args)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == PREEMPTED:
            print("megatronlite: the workers saved a checkpoint and stopped on request", file=sys.stderr)
            sys.exit(PREEMPTED)
        reason = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        reason = (reason or "").strip().splitlines()[-1:] or [f"exit code {failure.exitcode}"]
        signal = f" (signal {failure.signal_name()})" if failure.exitcode < 0 else ""
        print(
            f"megatronlite: error: rank {rank} failed with exit code {failure.exitcode}"
            f"{signal}: {reason[0]}; the other workers were stopped",
            file=sys.stderr,
        )
        sys.exit(2 if failure.exitcode == 2 else 1)
