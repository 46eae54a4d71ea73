"""`megatronlite config from-megatron SOURCE [SCRIPT_ARGS ...] [-o OUT.yaml]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatronlite.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "from-megatron",
        help="a Megatron-LM training script (or checkpoint) as a megatronlite config",
        description="Read the pretrain_gpt.py command a Megatron-LM bash script runs (or the args a Megatron "
        "checkpoint stores) and write the equivalent megatronlite config. Every flag that cannot be mapped "
        "is listed on stderr and at the top of the config.",
    )
    p.add_argument("source", help="a bash script running pretrain_gpt.py, or a Megatron checkpoint directory")
    p.add_argument(
        "script_args",
        nargs="*",
        metavar="SCRIPT_ARG",
        help="the script's arguments (its $1, $2, ...), right after SOURCE",
    )
    p.add_argument("-o", "--output", help="the YAML file to write (default: print the config)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from megatronlite.from_megatron import convert_source, render

    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    conversion = convert_source(Path(args.source), args.script_args)
    text = render(conversion)
    report = conversion.report.lines()
    if report:
        print("\n".join(report), file=sys.stderr)
    if out is None:
        print(text, end="")
        return
    out.write_text(text)
    print(f"megatronlite: wrote {out} ({len(conversion.report.mapped)} flags mapped)", file=sys.stderr)
