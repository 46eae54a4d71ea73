"""Checkpoints as plain global tensors, one at a time: what converters read and write.

A weights-only checkpoint (meta `weights_only: true`) holds the `model.*` tensors and no
optimizer state; `train` with `checkpoint.load: PATH` starts from it at step 0 with a fresh
optimizer. Names are the global names of `megatronlite.checkpoint.views` (fused parts split:
`layers.0.mlp.fc1.weight.gate`), shapes are unpadded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import yaml

from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import model_pieces
from megatronlite.config import Config
from megatronlite.models.gpt import GPTModel
from megatronlite.parallel.mesh import Mesh
from megatronlite.version import versions


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Global name (without `model.`) -> shape of every weight a checkpoint of `cfg` holds."""
    with torch.device("meta"):
        model = GPTModel(cfg.model)
    pieces = model_pieces(dict(model.named_parameters()), Mesh(), for_save=True)
    return {k.removeprefix("model."): v.global_shape for k, v in pieces.items()}


def read_tensors(step_dir: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Load the named global tensors one at a time (memory: one tensor)."""
    shapes = store.stored_shapes(step_dir)
    for name in names:
        key = f"model.{name}"
        if key not in shapes:
            raise KeyError(name)
        out = {key: torch.empty(shapes[key])}
        store.read_shards(step_dir, out)
        yield name, out[key]


def write_checkpoint(run_dir: Path, cfg: Config, tensors: Iterable[tuple[str, torch.Tensor]], step: int = 0) -> Path:
    """Write a weights-only checkpoint `run_dir/checkpoints/step_N` plus `run_dir/config.yaml`.

    Every expected tensor must be given with its exact shape; DCP writes them in one call.
    """
    expected = expected_shapes(cfg)
    got = {}
    for name, t in tensors:
        if name not in expected:
            raise ValueError(f"unexpected tensor {name}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
        got[f"model.{name}"] = t.detach().float().contiguous()
    missing = sorted(set(expected) - {k.removeprefix("model.") for k in got})
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing[:5])}")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = store.prepare(root, step)
    store.write_shards(tmp, got)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_yaml)
    meta = {
        "step": step,
        "consumed_samples": 0,
        "weights_only": True,
        "layout": {"tensor": 1, "pipeline": 1, "data": 1, "world_size": 1},
        "model": cfg.to_dict()["model"],
        "versions": versions(),
    }
    return store.commit(root, step, meta, config_yaml, keep=0, keep_every=0)
