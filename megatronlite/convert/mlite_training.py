"""A converted model that carries Adam's state, written as a native training checkpoint so that `train`
continues the source's run: its step (the LR schedule's position), Adam's moments and step count.

The data position does not convert (consumed samples start at 0), and RNG states are re-derived.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint import store
from megatronlite.checkpoint.weights import LazyChunk, expected_shapes, save_chunks
from megatronlite.convert import mlite
from megatronlite.convert.deepspeed import MOMENTS, TrainingCheckpoint
from megatronlite.convert.mapping import Get
from megatronlite.convert.model_state import Options
from megatronlite.convert.parking import Staging
from megatronlite.version import versions


def write(ckpt: TrainingCheckpoint, dst: Path, options: Options) -> None:
    """mlite's run directory (config, tokenizer, weights-only step 0), then weights and moments as the training
    checkpoint of the source's step, which becomes `latest` (step 0 is removed: the weights are written twice,
    which keeps one writer of run directories)."""
    mlite.write(ckpt, dst, options)
    config_yaml = (dst / "config.yaml").read_text()
    cfg = config_mod.load(dst / "config.yaml")
    root = dst / "checkpoints"
    with Staging(dst) as staging:
        sources: dict[str, Get] = {"model": ckpt.get, **{f"optim.{k}": ckpt.moments[k] for k in MOMENTS}}

        def chunk(prefix: str, name: str, shape: tuple[int, ...]) -> LazyChunk:
            def load() -> torch.Tensor:
                return staging.put(sources[prefix](name).float())

            return LazyChunk(f"{prefix}.{name}", shape, (0,) * len(shape), shape, torch.float32, load)

        chunks = [chunk(p, n, s) for p in sources for n, s in expected_shapes(cfg).items()]
        save_chunks(store.prepare(root, ckpt.step), chunks)
    meta = {
        "step": ckpt.step,
        "optimizer_steps": ckpt.optimizer_steps,
        "nonfinite_skips": 0,
        "consumed_samples": 0,
        "loss_scale": None,
        "layout": {"tensor": 1, "pipeline": 1, "data": 1, "world_size": 1},  # never a run's: RNG is re-derived
        "model": cfg.to_dict()["model"],
        "versions": versions(),
    }
    store.commit(root, ckpt.step, meta, config_yaml, keep=1, keep_every=0)
