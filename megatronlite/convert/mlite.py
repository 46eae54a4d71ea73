"""megatronlite's native checkpoints: a run directory, its `checkpoints/`, or one step directory.

Reading takes the `model.*` tensors of any checkpoint (weights-only or a training one with
optimizer state). Writing makes a run directory skeleton, `DST/config.yaml` plus
`DST/checkpoints/step_0000000/` (weights only; from a source that carries Adam's state, such as
DeepSpeed's, a training checkpoint at the source's step instead), ready for `train --set
checkpoint.load=DST`, with the tokenizer files in `DST/tokenizer/` and `data.tokenizer` pointing at them.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from megatronlite.checkpoint import store
from megatronlite.checkpoint.model_loader import load_config
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint_lazily
from megatronlite.convert.dcp_store import DcpStore, stored_tensors, whole
from megatronlite.convert.mapping import Get, Mapping, rename
from megatronlite.convert.model_state import Checkpoint, Options, from_store, side_files
from megatronlite.convert.parking import Staging

TOKENIZER_DIR = "tokenizer"


def _tokenizer_files(tokenizer: str) -> dict[str, Path]:
    if tokenizer == "byte":
        return {}
    path = Path(tokenizer)
    directory = path if path.is_dir() else path.parent
    files = side_files(directory)
    if path.is_file():
        files["tokenizer.json"] = path
    return files


def read(path: Path, options: Options) -> Checkpoint:
    step_dir = store.find_step_dir(path)
    store.read_meta(step_dir)
    cfg = load_config(step_dir)
    boxes = {
        key.removeprefix("model."): whole(key, shape, dtype)
        for key, (shape, dtype) in stored_tensors(step_dir).items()
        if key.startswith("model.")
    }
    mapping = Mapping([rename(n, n) for n in expected_shapes(cfg)])
    files = _tokenizer_files(cfg.data.tokenizer)
    return from_store(cfg, DcpStore(step_dir, boxes), mapping, lambda name: False, files)


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    cfg = dataclasses.replace(ckpt.cfg, name=dst.name)
    dst.mkdir(parents=True)
    if "tokenizer.json" in ckpt.side_files:
        tokenizer_dir = dst / TOKENIZER_DIR
        tokenizer_dir.mkdir()
        for name, f in ckpt.side_files.items():
            shutil.copy2(f, tokenizer_dir / name)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer_dir.resolve())))
    with Staging(dst) as staging:  # DCP's writer holds every tensor of a file until the file is done

        def parked(get: Get) -> Callable[[str], torch.Tensor]:
            return lambda name: staging.put(get(name).float())

        training = ckpt.training
        if training is None:  # weights only: `train` starts from them at step 0
            write_checkpoint_lazily(dst, cfg, parked(ckpt.get))
        else:  # Adam's state too: `train` continues the source's run at its step
            moments = {kind: parked(get) for kind, get in training.moments.items()}
            write_checkpoint_lazily(dst, cfg, parked(ckpt.get), training.step, moments, training.optimizer_steps)
