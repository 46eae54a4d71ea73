"""`megatronlite plan CONFIG --gpus N`: the layouts that fit, best first, with memory parts and step time."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

from megatronlite import config
from megatronlite.errors import UserError
from megatronlite.plan import hardware
from megatronlite.plan.estimate import Estimate, Planner, gib, seconds, why_better

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def token_count(text: str) -> float:
    """`15T`, `300B`, `2.5e12` -> tokens."""
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([KMBGT]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise UserError(f"--tokens {text!r}: expected a number with an optional K, M, B or T suffix, e.g. 15T")
    return float(match[1]) * _SUFFIX[match[2].upper()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the config to plan (with --calibrate: the finished run's directory)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs the run would use")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside one node (default 8)")
    p.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(hardware.GPUS)} (default h100)")
    p.add_argument("--seq-len", type=int, help="train.seq_len to plan for (default: the config's)")
    p.add_argument("--global-batch", type=int, help="train.global_batch_size in sequences (default: the config's)")
    p.add_argument("--top", type=int, default=10, help="layouts to show (default 10)")
    p.add_argument("--tokens", default="15T", help="token budget for the days-to-train column (default 15T)")
    p.add_argument("--json", action="store_true", help="every layout as one JSON document")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the --gpu type's matmul efficiency to the run directory given as CONFIG (its config.yaml and "
        f"metrics.jsonl, trained on --gpus GPUs) and store it in {hardware.CALIBRATION_FILE}",
    )
    p.set_defaults(func=main)


def _load(args: argparse.Namespace) -> config.Config:
    sets = list(args.set)
    if args.seq_len is not None:
        sets.append(f"train.seq_len={args.seq_len}")
    if args.global_batch is not None:
        sets.append(f"train.global_batch_size={args.global_batch}")
    cfg = config.load(args.config, sets)
    cfg.train.precision = config.precision_on(cfg.train, "cuda")  # a plan is for GPUs: auto is bf16 there
    return cfg


def _record(e: Estimate, tokens: float) -> dict:
    return {
        "layout": asdict(e.layout),
        "fits": e.fits,
        "heaviest_stage": e.stage,
        "memory_bytes": {**e.memory.parts(), "total": e.memory.total},
        "step_seconds": {**e.time.parts(), "total": e.time.total},
        "tokens_per_sec": e.tokens_per_sec,
        "mfu": e.mfu,
        "days": tokens / e.tokens_per_sec / 86400,
    }


def _table(rows: list[Estimate], tokens: float) -> list[str]:
    head = f"{'layout':<40} {'mem/GPU':>9} {'w+g+opt':>9} {'act':>8} {'step':>8} {'bubble':>7} {'comm':>7}"
    lines = [head + f" {'tok/s':>10} {'MFU':>6} {'days':>7}"]
    for e in rows:
        m, t = e.memory, e.time
        states = m.weights + m.weight_copies + m.grads + m.optimizer
        comm = t.tp + t.cp + t.ep + t.pp + t.dp
        lines.append(
            f"{e.layout.name():<40} {gib(m.total):>9} {gib(states):>9} {gib(m.activations + m.loss):>8} "
            f"{seconds(t.total):>8} {t.bubble / t.total:>7.1%} {comm / t.total:>7.1%} "
            f"{e.tokens_per_sec:>10,.0f} {e.mfu:>6.1%} {tokens / e.tokens_per_sec / 86400:>7.1f}"
        )
    return lines


def main(args: argparse.Namespace) -> None:
    if args.gpus < 1:
        raise UserError(f"--gpus must be a positive number of GPUs, got {args.gpus}")
    if args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be positive, got {args.gpus_per_node}")
    if args.top < 1:
        raise UserError(f"--top must be a positive number of layouts to show, got {args.top}")
    hw = hardware.gpu(args.gpu)
    if args.calibrate:
        from megatronlite.plan import calibrate

        run = Path(args.config)
        eff = calibrate.fit(run, args.gpus, args.gpus_per_node, hw)
        calibrate.store(args.gpu, eff, run)
        print(f"{args.gpu}: matmul efficiency {eff:.3f} from {run} on {args.gpus} GPUs -> {hardware.CALIBRATION_FILE}")
        return
    tokens = token_count(args.tokens)
    cfg = _load(args)
    eff, source = hardware.efficiency(args.gpu)
    estimates = Planner(cfg, args.gpus, args.gpus_per_node, hw, eff).all()
    if not estimates:
        raise UserError(
            f"no legal layout of {cfg.name} on {args.gpus} GPUs: the global batch ({cfg.train.global_batch_size}) "
            f"must divide over the data-parallel ranks; try --global-batch {args.gpus * 8} or another --gpus"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "gpu": args.gpu,
                    "efficiency": eff,
                    "efficiency_source": source,
                    "layouts": [_record(e, tokens) for e in estimates],
                },
                indent=1,
            )
        )
        return
    fitting = [e for e in estimates if e.fits]
    print(
        f"{cfg.name} on {args.gpus} x {args.gpu} ({gib(hw.memory)} each), seq {cfg.train.seq_len}, global batch "
        f"{cfg.train.global_batch_size}: {len(estimates)} legal layouts, {len(fitting)} fit; matmul efficiency "
        f"{eff:.2f} ({source}); days for {args.tokens} tokens"
    )
    if not fitting:
        least = min(estimates, key=lambda e: e.memory.total)
        print(f"nothing fits: the smallest, {least.layout.name()} (stage {least.stage}), {least.overflow()}")
        return
    print("\n".join(_table(fitting[: args.top], tokens)))
    if len(fitting) > 1:
        print(why_better(fitting[0], fitting[1]))
    unfit = [e for e in estimates if not e.fits]
    if unfit:
        fastest = unfit[0]
        print(f"faster but does not fit: {fastest.layout.name()} (stage {fastest.stage}) {fastest.overflow()}")
