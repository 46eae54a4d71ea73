"""megatronlite's native checkpoints: a run directory, its `checkpoints/`, or one step directory.

Reading takes the `model.*` tensors of any checkpoint and, from a training one, Adam's moments
(`optim.exp_avg.*`, `optim.exp_avg_sq.*`) with meta.json's step, optimizer_steps and consumed_samples
(a training checkpoint's loss scale and RNG states stay behind). Writing makes a run directory skeleton,
`DST/config.yaml` plus `DST/checkpoints/step_0000000/` (weights only; from a source that carries Adam's
state, such as DeepSpeed's or Megatron's, a training checkpoint at the source's step and data position
instead), ready for `train --set checkpoint.load=DST`, with the tokenizer files in `DST/tokenizer/` and
`data.tokenizer` pointing at them.
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
from megatronlite.convert.fields import COUNT, require
from megatronlite.convert.mapping import Get, Mapping, rename
from megatronlite.convert.model_state import Checkpoint, Options, TrainingState, from_store, side_files
from megatronlite.convert.parking import Staging

TOKENIZER_DIR = "tokenizer"
MOMENTS = ("exp_avg", "exp_avg_sq")  # a training checkpoint's Adam states: optim.<kind>.<global name>


def _tokenizer_files(tokenizer: str) -> dict[str, Path]:
    if tokenizer == "byte":
        return {}
    path = Path(tokenizer)
    directory = path if path.is_dir() else path.parent
    files = side_files(directory)
    if path.is_file():
        files["tokenizer.json"] = path
    return files


def no_extras(name: str) -> bool:
    return False


def _store(step_dir: Path, tensors: dict, prefix: str) -> DcpStore:
    """The stored tensors under `prefix` (`model.`, `optim.exp_avg.`...), by our global names."""
    boxes = {k.removeprefix(prefix): whole(k, s, dtype) for k, (s, dtype) in tensors.items() if k.startswith(prefix)}
    return DcpStore(step_dir, boxes)


def read(path: Path, options: Options) -> Checkpoint:
    step_dir = store.find_step_dir(path)
    meta = store.read_meta(step_dir)
    cfg = load_config(step_dir)
    tensors = stored_tensors(step_dir)
    mapping = Mapping([rename(n, n) for n in expected_shapes(cfg)])
    files = _tokenizer_files(cfg.data.tokenizer)
    ckpt = from_store(cfg, _store(step_dir, tensors, "model."), mapping, no_extras, files)
    ckpt.seed = cfg.train.seed
    if meta.get("weights_only") or options.weights_only:
        return ckpt
    moments = {k: from_store(cfg, _store(step_dir, tensors, f"optim.{k}."), mapping, no_extras).get for k in MOMENTS}
    where = step_dir / store.META
    step = require(meta, "step", where, COUNT)
    steps = require(meta, "optimizer_steps", where, COUNT, step)
    consumed = require(meta, "consumed_samples", where, COUNT, 0)
    ckpt.training = TrainingState(moments, step, steps, consumed, "meta.json")
    return ckpt


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
            steps, consumed = training.optimizer_steps, training.consumed_samples
            write_checkpoint_lazily(dst, cfg, parked(ckpt.get), training.step, moments, steps, consumed)
