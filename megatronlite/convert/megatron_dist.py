"""Megatron's `torch_dist` format: a DCP directory written by megatron-core's dist_checkpointing,
plus `common.pt` (the non-tensor state, with Megatron-LM's args) and `metadata.json` (the backend).

Layer tensors are stored stacked, `decoder.layers.mlp.linear_fc2.weight` of shape [layers, ...],
in whatever chunks the writer's TP/PP layout had; reading one layer reads just its box. We write
one chunk per layer, so memory stays near one layer's tensor, and any TP/PP layout can load it
(megatron-core reshards, and pads or trims the vocabulary rows to its own padded size).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from megatronlite.checkpoint.weights import LazyChunk, expected_shapes, save_chunks
from megatronlite.convert.dcp_store import Box, DcpStore, stored_tensors, whole
from megatronlite.convert.mapping import Mapping
from megatronlite.convert.megatron_names import LAYER
from megatronlite.convert.model_state import Checkpoint
from megatronlite.convert.parking import Staging
from megatronlite.errors import UserError
from megatronlite.untrusted import load_torch_file

METADATA = "metadata.json"
COMMON = "common.pt"
BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
STACKED = "decoder.layers."
SKIPPED = ("optimizer.",)  # a training checkpoint's optimizer state
LINEARS = tuple(f"{m}.weight" for m in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))


def is_dist(directory: Path) -> bool:
    return (directory / METADATA).is_file()


def load_args(directory: Path) -> dict:
    try:
        backend = json.loads((directory / METADATA).read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{directory / METADATA}: not valid JSON ({e})") from None
    if backend != "torch_dist":
        raise UserError(f"{directory}: sharded backend {backend!r}; megatronlite reads torch_dist and legacy torch")
    common = load_torch_file(directory / COMMON)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{directory / COMMON}: no Megatron-LM args; they hold the model's shape, needed to convert it")
    return vars(args)


def open_store(directory: Path, args: dict) -> DcpStore:
    layers = args["num_layers"]
    boxes = {}
    for key, (shape, dtype) in stored_tensors(directory).items():
        if key.startswith(SKIPPED):
            continue
        rest = key.removeprefix(STACKED)
        if key == rest or rest.split(".")[0].isdigit():  # not stacked (or saved per layer)
            boxes[key] = whole(key, shape, dtype)
            continue
        if shape[0] != layers:
            raise UserError(f"{directory}: tensor {key} stacks {shape[0]} layers; args.num_layers is {layers}")
        for i in range(layers):
            boxes[f"{STACKED}{i}.{rest}"] = Box(key, (i,) + (0,) * (len(shape) - 1), (1, *shape[1:]), dtype, True)
    return DcpStore(directory, boxes)


def _extra_states(chunks: list[LazyChunk], layers: int) -> dict[str, list[None]]:
    """Per-layer `_extra_state` objects (FP8 metadata; None without it), which megatron-core's loader
    requires for every linear layer, and for Transformer Engine's attention (ignored by local layers).
    megatron-core stores each object as a one-element list under `KEY/shard_LAYER_LAYERS`."""
    modules = {c.key.removesuffix(".weight") for c in chunks if c.key.startswith(STACKED) and c.key.endswith(LINEARS)}
    modules |= {m.replace(".linear_qkv", ".core_attention") for m in modules if m.endswith(".linear_qkv")}
    return {f"{m}._extra_state/shard_{i}_{layers}": [None] for m in sorted(modules) for i in range(layers)}


def write(directory: Path, mapping: Mapping, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype) -> None:
    with Staging(directory) as staging:  # DCP's writer holds every tensor of a file until the file is done

        def load(name: str, stacked: bool) -> torch.Tensor:
            t = staging.put(mapping.theirs(name, ckpt.get).to(dtype))
            return t.unsqueeze(0) if stacked else t

        chunks = []
        for name, shape in mapping.their_shapes(expected_shapes(ckpt.cfg)).items():
            layer = LAYER.fullmatch(name)
            if layer is None:
                whole_tensor = functools.partial(load, name, False)
                chunks.append(LazyChunk(name, shape, (0,) * len(shape), shape, dtype, whole_tensor))
                continue
            offsets = (int(layer[1]),) + (0,) * len(shape)
            key, stacked = STACKED + layer[2], (args.num_layers, *shape)
            chunks.append(LazyChunk(key, stacked, offsets, (1, *shape), dtype, functools.partial(load, name, True)))
        save_chunks(directory, chunks, _extra_states(chunks, args.num_layers))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0}, directory / COMMON)
    (directory / METADATA).write_text(json.dumps(BACKEND))
