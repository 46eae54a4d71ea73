"""`megatronlite convert --from FMT --to FMT SRC DST [--verify]`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from megatronlite.errors import UserError

if TYPE_CHECKING:
    from megatronlite.config import ModelConfig

# the keys of formats.FORMATS and model_state.OUTPUT_DTYPES, named here so that `convert --help` imports no torch
FORMAT_NAMES = ("mlite", "hf", "megatron", "torch", "deepspeed")
DTYPE_NAMES = ("fp32", "bf16", "fp16")
CARRY_THE_RUN = ("mlite", "megatron")  # the formats that hold a run's optimizer state and position

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
PATHS = (
    "mlite: a run directory, its checkpoints/ or a step directory; hf: a model directory; "
    "megatron: a checkpoint root or an iter_*/release directory; torch: a .pt file; "
    "deepspeed: a run directory holding `latest`, or a global_stepN directory"
)


def parse_size(text: str) -> int:
    """'5GB' (HF's units: GB = 10^9 bytes, GiB = 2^30) -> bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = found and (found[2].upper() or "B")
    if not found or unit not in UNITS:
        raise UserError(f"--max-shard-size {text!r}: expected a number with a unit, e.g. 5GB, 500MB, 2GiB")
    return int(found[1]) * UNITS[unit]


def features(m: ModelConfig) -> str:
    """The features a reader of the summary line would not assume from the shape: biases, qk-norm, window..."""
    named = {
        "biases": m.bias,
        "qkv bias": m.qkv_bias and not m.bias,
        "qk-norm": m.qk_norm,
        f"head_dim {m.head_size}": m.head_size * m.num_heads != m.hidden_size,
        f"window {m.sliding_window}": m.sliding_window,
        f"{(m.rope_scaling or {}).get('type')} rope scaling": m.rope_scaling,
        "tied output": m.tied,
    }
    on = [name for name, present in named.items() if present]
    return f"; {', '.join(on)}" if on else ""


def _run_line(ckpt, dst_format: str) -> str:
    """What became of a training checkpoint's run: carried (mlite, megatron) or left behind (weights-only formats)."""
    t = ckpt.training
    if dst_format not in CARRY_THE_RUN:
        return f"note: {dst_format} holds weights only; the source's optimizer state and step {t.step} stay behind"
    line = (
        f"carried the run: step {t.step}, {t.consumed_samples} consumed samples, Adam's moments and its step count "
        f"{t.optimizer_steps} (from {t.optimizer_steps_from})"
    )
    if dst_format == "megatron":
        line += "; Megatron-LM resumes it with --use-distributed-optimizer --no-load-rng"
    return line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"Convert a checkpoint between formats. {PATHS}."
    p.add_argument("--from", dest="src_format", required=True, choices=FORMAT_NAMES, help="the source's format")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMAT_NAMES, help="the output's format")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="a new path (never overwritten)")
    p.add_argument("--verify", action="store_true", help="run both models on fixed tokens and compare their logits")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="output dtype (default: the source's; mlite is always fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="hf output: split safetensors above this size")
    p.add_argument("--vocab-size", type=int, help="megatron input: the unpadded vocabulary (default: args.vocab_size)")
    p.add_argument("--megatron-format", choices=("torch_dist", "torch"), default="torch_dist", help="megatron output")
    p.add_argument("--megatron-tp", type=int, default=1, help="megatron output: tensor-parallel size (vocab padding)")
    p.add_argument("--megatron-pp", type=int, default=1, help="megatron output (torch format): pipeline stages")
    p.add_argument(
        "--megatron-ep", type=int, default=1, help="megatron output (torch format, MoE): expert-parallel size"
    )
    p.add_argument("--hf-config", metavar="DIR", help="deepspeed input: the directory of the model's config.json")
    p.add_argument(
        "--megatron-spec",
        choices=("te", "local"),
        default="te",
        help="megatron output: TE or local norm names (torch format; torch_dist: an MoE layer's pre-MLP norm)",
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="convert the weights alone, leaving a training checkpoint's optimizer state, step and data position "
        "behind (needed for optimizer state megatronlite cannot carry)",
    )


def main(args: argparse.Namespace) -> None:
    import torch

    from megatronlite.convert.deepspeed import DeepSpeedOptions
    from megatronlite.convert.formats import convert
    from megatronlite.convert.model_state import OUTPUT_DTYPES, output_dtype

    options = DeepSpeedOptions(
        hf_config=Path(args.hf_config) if args.hf_config else None,
        dtype=OUTPUT_DTYPES[args.dtype] if args.dtype else None,
        max_shard_bytes=parse_size(args.max_shard_size),
        megatron_format=args.megatron_format,
        megatron_tp=args.megatron_tp,
        megatron_pp=args.megatron_pp,
        megatron_ep=args.megatron_ep,
        megatron_spec=args.megatron_spec,
        vocab_size=args.vocab_size,
        weights_only=args.weights_only,
    )
    if args.hf_config and args.src_format != "deepspeed":
        raise UserError("--hf-config is for --from deepspeed (an hf source holds its config.json)")
    if min(args.megatron_tp, args.megatron_pp, args.megatron_ep) < 1:
        raise UserError("--megatron-tp, --megatron-pp and --megatron-ep must be >= 1")
    src, dst = Path(args.src), Path(args.dst)
    if args.verify:  # refuse before anything is written, not after the conversion
        from megatronlite.convert.verify import transformers_for

        transformers_for((args.src_format, args.dst_format))
    ckpt = convert(args.src_format, args.dst_format, src, dst, options)
    m = ckpt.cfg.model
    written_as = ""
    if args.dst_format == "hf":  # chosen by the model's features, not its preset name
        from megatronlite.convert.hf import family_for

        written_as = f" as {family_for(m).ARCHITECTURE}"
    print(
        f"converted {args.src_format} {src} -> {args.dst_format} {dst}{written_as}: {m.arch}, {m.num_layers} layers, "
        f"hidden {m.hidden_size}, {m.num_heads} heads ({m.kv_heads} KV), vocabulary {m.vocab_size}{features(m)}"
    )
    if ckpt.training is not None:  # (none with --weights-only)
        print(_run_line(ckpt, args.dst_format))
    for note in ckpt.notes:
        print(f"note: {note}")
    if args.verify:
        from megatronlite.convert.verify import verify

        narrowed = torch.finfo(output_dtype(ckpt, options)).bits < torch.finfo(ckpt.dtype).bits
        report = verify((args.src_format, src), (args.dst_format, dst), m, options, narrowed)
        print("\n".join(report.lines()))
        if not report.passed:
            raise UserError("verify: the converted model computes other logits than the source (see above)")
