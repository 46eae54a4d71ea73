"""`megatronlite <command>`: one entry point. A UserError anywhere prints one line and exits 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from megatronlite.errors import UserError


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", help="where config.yaml, metrics.jsonl and checkpoints/ go (default runs/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML)")


def cmd_train(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(_dry_run if args.dry_run else _train)(args)
    finally:
        # after `record` wrote a failed worker's error file: its peers, which fail when its connections close,
        # fail after it on disk too, and the launcher names the worker that failed first (launcher/torchrun.py)
        if dist.is_initialized():
            dist.destroy_process_group()


def _device_kind(cfg) -> str:
    """cuda or cpu, per train.device (auto: cuda where there is one)."""
    import torch

    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda but no CUDA device is available; use train.device: cpu or auto")
    return kind


def _dry_run(args: argparse.Namespace) -> None:
    import torch

    from megatronlite import config
    from megatronlite.train.dry_run import dry_run
    from megatronlite.train.trainer import resolve_precision

    cfg = config.load(args.config, args.set)
    run_dir = config.run_dir(cfg, args.run_dir)
    world = int(os.environ.get("WORLD_SIZE", 1)) if args.workers is None else args.workers
    if world < 1:
        raise UserError(f"--workers must be a positive number of workers, got {world}")
    device = torch.device(_device_kind(cfg))
    resolve_precision(cfg, device)
    report, fits = dry_run(cfg, run_dir, world, device, _workers_here(world))
    print("\n".join(report))
    warned = "" if fits else " (but see the memory warning)"
    print(f"megatronlite: dry run of {cfg.name}: every check passed{warned}; nothing was started")


def _train(args: argparse.Namespace) -> None:
    import torch

    from megatronlite import config
    from megatronlite.launcher.torchrun import die_with_launcher
    from megatronlite.parallel.mesh import build_mesh, cuda_device, init_distributed
    from megatronlite.parallel.stages import model_allocation
    from megatronlite.plan.device_fit import memory_report
    from megatronlite.train.metrics import print_line
    from megatronlite.train.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
    from megatronlite.train.preemption import Preempted, listen
    from megatronlite.train.run_lock import lock_run_dir
    from megatronlite.train.trainer import Trainer, resolve_precision, run_options
    from megatronlite.train.watchdog import Watchdog

    die_with_launcher()
    listen()  # save-and-stop signals count from here: one during start-up is a request, not the end of the worker
    cfg = config.load(args.config, args.set)
    run_dir = config.run_dir(cfg, args.run_dir)
    kind = _device_kind(cfg)
    world, rank, local_rank = init_distributed(kind, cfg.parallel.timeout_minutes)
    lock = None
    try:
        device = cuda_device(local_rank) if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(device)
        lock = lock_run_dir(run_dir, rank, world, device)  # before anything in the run directory is written
        resolve_precision(cfg, device)
        mesh = build_mesh(cfg, world, rank)
        if rank == 0:  # before anything is allocated: a layout predicted not to fit is named with its figure
            line, fits = memory_report(cfg, world, run_options(cfg, device), device, _workers_here(world))
            if not fits:
                print_line(f"megatronlite: {line}")
        # start-up too is watched: a rank that stops (say, while building the data index the others wait for)
        with Watchdog(run_dir, rank, world, cfg.parallel.timeout_minutes * 60) as dog:
            dog.beat(0, "start-up: data, model and optimizer")
            with model_allocation(cfg, device):  # the model, its copy on the GPU and its optimizer state
                trainer = Trainer(cfg, run_dir, mesh, device)
            trainer.run(dog)
    except Preempted as e:
        if rank == 0:
            print(f"megatronlite: {e}; resume with checkpoint.load: auto", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    finally:
        if lock is not None:
            lock.release()


def cmd_generate(args: argparse.Namespace) -> None:
    from megatronlite.checkpoint.model_loader import load_model
    from megatronlite.train.generate import check_sampling, generate

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before the checkpoint is read
    model = load_model(args.checkpoint)
    new = generate(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + new)


def _workers_here(world: int) -> int:
    """Workers on this node (they share its RAM on CPU): torchrun's and srun's local world size."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return world


def _setup_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    _add_train_options(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check a run makes before its first step (layout, memory, checkpoint, data), print the "
        "resolved config and start nothing",
    )
    p.add_argument("--workers", type=int, help="with --dry-run: the job's world size (default $WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train)


def _setup_launch(p: argparse.ArgumentParser) -> None:
    from megatronlite.launcher import torchrun

    torchrun.add_arguments(p)
    _add_train_options(p)
    p.set_defaults(func=torchrun.main)


def _setup_submit(p: argparse.ArgumentParser) -> None:
    from megatronlite.launcher import slurm

    slurm.add_arguments(p)
    _add_train_options(p)
    p.set_defaults(func=slurm.main)


def _setup_sweep(p: argparse.ArgumentParser) -> None:
    from megatronlite.launcher import sweep

    sweep.add_arguments(p)
    p.set_defaults(func=sweep.main)


def _setup_preprocess(p: argparse.ArgumentParser) -> None:
    from megatronlite.data import preprocess

    preprocess.add_arguments(p)
    p.set_defaults(func=preprocess.main)


def _setup_tokenizer(p: argparse.ArgumentParser) -> None:
    from megatronlite.data import tokenizer_train

    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tp = tsub.add_parser("train", help="train a tokenizer.json on local text")
    tokenizer_train.add_arguments(tp)
    tp.set_defaults(func=tokenizer_train.main)


def _setup_data(p: argparse.ArgumentParser) -> None:
    from megatronlite.data import run as run_data

    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser("prebuild", help="build the token and sample-index caches that `train CONFIG` reads")
    run_data.add_arguments(dp)
    dp.set_defaults(func=run_data.main)


def _setup_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run directory, its checkpoints/ directory or one step directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def _setup_convert(p: argparse.ArgumentParser) -> None:
    from megatronlite.convert import cli as convert_cli

    convert_cli.add_arguments(p)
    p.set_defaults(func=convert_cli.main)


def _setup_plot(p: argparse.ArgumentParser) -> None:
    from megatronlite import curves

    curves.add_arguments(p)


def _setup_plan(p: argparse.ArgumentParser) -> None:
    from megatronlite.plan import cli as plan_cli

    plan_cli.add_arguments(p)


def _setup_doctor(p: argparse.ArgumentParser) -> None:
    from megatronlite import doctor

    doctor.add_arguments(p)


def _setup_config(p: argparse.ArgumentParser) -> None:
    from megatronlite.from_megatron import cli as config_cli

    config_cli.add_arguments(p)


# name: (help, setup). A command's setup imports its module: only the command that runs pays for it.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "train": ("train from a YAML config (one worker, or each worker under torchrun/srun)", _setup_train),
    "launch": ("start the workers of a run on this node with torchrun", _setup_launch),
    "submit": ("submit a run to Slurm (an sbatch script from a template in launch/)", _setup_submit),
    "sweep": ("run a hyperparameter sweep locally or as a Slurm job array", _setup_sweep),
    "preprocess": ("tokenize .jsonl/.txt(.gz/.zst) into Megatron .bin/.idx", _setup_preprocess),
    "tokenizer": ("train a byte-level BPE tokenizer", _setup_tokenizer),
    "data": ("prepare a run's data ahead of training", _setup_data),
    "generate": ("continue a prompt with a checkpoint", _setup_generate),
    "convert": ("convert a checkpoint: mlite, hf, megatron, torch (both ways)", _setup_convert),
    "plot": ("draw runs' metrics (loss, eval loss, tokens/s, ...) against the step into one PNG", _setup_plot),
    "plan": ("predicted memory per GPU and step time of every legal layout on N GPUs", _setup_plan),
    "doctor": ("versions, GPUs, the kernels auto picks, Slurm: what to paste into a bug report", _setup_doctor),
    "config": ("write a megatronlite config from a Megatron-LM training script or checkpoint", _setup_config),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command listed (top-level --help), but only `command`'s arguments set up and its modules imported."""
    parser = argparse.ArgumentParser(prog="megatronlite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if name == command:
            setup(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level takes no option but --help
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"megatronlite: error: {prefix}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
