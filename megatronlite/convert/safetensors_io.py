"""HF safetensors files: read lazily with `safetensors`, written tensor by tensor.

Reading opens each file with `safe_open` (memory-mapped) and copies out one tensor at a time.
The `safetensors` library writes a file from a dict of every tensor in it, which would hold a
whole shard in memory; the format is simple (an 8-byte header length, a JSON header of names,
dtypes, shapes and byte ranges, then the raw little-endian bytes), so we write the header from
the planned shapes and stream each tensor's bytes after it. The tests read every file we write
back with `safetensors` and `transformers`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from megatronlite.convert.fields import OBJECT, TEXT_MAP, check, read_json, require
from megatronlite.errors import UserError
from megatronlite.extras import require as require_extra
from megatronlite.untrusted import plain_name

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsStore:
    """The tensors of an HF model directory: one `model.safetensors`, or shards named by the index."""

    def __init__(self, directory: Path) -> None:
        safe_open = require_extra("safetensors", "hf", "convert --from hf").safe_open
        self.where = directory
        if (directory / INDEX).is_file():
            files = self._read_index(directory / INDEX)
        elif (directory / SINGLE).is_file():
            files = {None: directory / SINGLE}
        else:
            found = ", ".join(sorted(p.name for p in directory.glob("*.bin"))) or "none"
            raise UserError(
                f"{directory}: neither {SINGLE} nor {INDEX} found (other weight files: {found}); "
                "only safetensors weights are read"
            )
        self._open: dict[Path, object] = {}
        self._file: dict[str, Path] = {}
        for path in files.values():
            if not path.is_file():
                raise UserError(f"{path}: file not found (named by {directory / INDEX})")
            try:
                handle = self._open[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - the library raises its own error types for a corrupt file
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
            for name in handle.keys():
                self._file[name] = path

    def _read_index(self, index: Path) -> dict[str, Path]:
        raw = check(read_json(index, "safetensors index"), OBJECT, index, INDEX)
        weight_map = require(raw, "weight_map", index, TEXT_MAP)
        return {f: index.parent / plain_name(f, f"{index}: weight_map") for f in set(weight_map.values())}

    def keys(self) -> list[str]:
        return list(self._file)

    def meta(self, name: str) -> torch.Tensor:
        piece = self._open[self._file[name]].get_slice(name)
        dtype = piece.get_dtype()
        if dtype not in DTYPES:
            raise UserError(f"{self._file[name]}: tensor {name} has dtype {dtype}; readable: {', '.join(DTYPES)}")
        return torch.empty(piece.get_shape(), dtype=DTYPES[dtype], device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self._open[self._file[name]].get_tensor(name)


def _shard_plan(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Names in order, cut into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + dtype.itemsize * math.prod(shapes[name])
        entries[name] = {"dtype": NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def write_model(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[Path]:
    """Write `tensors` (in the order of `shapes`) as `model.safetensors` or shards plus an index."""
    plan = _shard_plan(shapes, dtype.itemsize, max_shard_bytes)
    if len(plan) == 1:
        files = [directory / SINGLE]
    else:
        files = [directory / f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    for path, names in zip(files, plan):
        header = _header(names, shapes, dtype)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for expected in names:
                name, t = next(tensors)
                if name != expected or tuple(t.shape) != shapes[name]:
                    raise ValueError(f"planned {expected} {list(shapes[expected])}, got {name} {list(t.shape)}")
                f.write(t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if len(plan) > 1:
        weight_map = {name: path.name for path, names in zip(files, plan) for name in names}
        total = sum(dtype.itemsize * math.prod(s) for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files
