"""The formats by name, and one conversion: read the source, write the destination."""

from __future__ import annotations

import shutil
from pathlib import Path

from megatronlite.convert import deepspeed, hf, megatron, mlite, torch_file
from megatronlite.convert.model_state import Checkpoint, Options
from megatronlite.errors import UserError

FORMATS = {"mlite": mlite, "hf": hf, "megatron": megatron, "torch": torch_file, "deepspeed": deepspeed}


def read(fmt: str, path: Path, options: Options) -> Checkpoint:
    if not path.exists():
        raise UserError(f"{path}: not found")
    return FORMATS[fmt].read(path, options)


def convert(src_format: str, dst_format: str, src: Path, dst: Path, options: Options) -> Checkpoint:
    """Convert `src` to a new `dst`; a failed conversion leaves no `dst` behind. Returns the source as read."""
    if dst.exists():
        raise UserError(f"{dst} already exists; conversion never overwrites, choose a new path")
    above = next(d for d in dst.absolute().parents if d.exists())  # where the writer would start making directories
    if not above.is_dir():
        raise UserError(f"{dst}: {above} is a file, not a directory; choose a destination under a directory")
    ckpt = read(src_format, src, options)  # checks names and shapes before anything is written
    if options.weights_only:  # asked for: the source's optimizer state and position stay behind
        ckpt.training = None
    try:
        FORMATS[dst_format].write(ckpt, dst, options)
    except BaseException:
        if dst.is_dir():
            shutil.rmtree(dst)
        else:
            dst.unlink(missing_ok=True)
        raise
    return ckpt
