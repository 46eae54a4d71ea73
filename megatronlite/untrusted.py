"""Reading files other people made: pickles that cannot run code, offsets checked against the files.

Checkpoints come from other people, and two formats we read are pickles: DCP's `.metadata` (ours
and Megatron's torch_dist) and `.pt` files (Megatron's `common.pt` and `mp_rank_*`, torch
exports). A pickle names the callables it wants called; loading one runs them. So:

- `.metadata` goes through `AllowListUnpickler`: a global is resolved only when its exact
  (module, name) pair is on a fixed list of DCP's dataclasses, torch dtypes and a few inert
  builtins. Protocol 4 lets a name be dotted (`os.system` "inside" an allowed module); such a
  name never equals an allowed one, and we resolve by plain `getattr`, never by walking dots.
- `.pt` files (and the common state newer megatron-core torch.saves into one entry of its DCP files) go
  through `torch.load(weights_only=True)`, torch's own restricted unpickler; the
  few foreign classes Megatron files name are bound to an inert `Placeholder` (or, for the
  argparse/SimpleNamespace holding Megatron's args, to themselves).
- Every (file, offset, length) the metadata names is checked against the directory before DCP
  reads it: a plain file name (no path), inside the file. DCP's own reader trusts both.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import io
import math
import pickle
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType

from megatronlite.errors import UserError

_DCP_CLASSES = (
    "Metadata",
    "StorageMeta",
    "MetadataIndex",
    "ChunkStorageMetadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "TensorProperties",
    "_MEM_FORMAT_ENCODING",
)
_TORCH_VALUES = tuple(
    name for name, v in vars(torch).items() if isinstance(v, torch.dtype | torch.layout | torch.memory_format)
)
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch.distributed.checkpoint.metadata", n) for n in _DCP_CLASSES}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    # megatron-core keeps every rank's save plan in the metadata (`all_local_plans`)
    | {("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "TensorWriteData")}
    | {("torch.distributed.checkpoint.planner", "WriteItemType")}
    | {("torch", n) for n in ("Size", *_TORCH_VALUES)}
    | {("torch.serialization", "_get_layout")}  # maps a layout's name to the torch.layout
    | {("pathlib", n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}
    | {("collections", "OrderedDict")}
    | {("builtins", n) for n in ("set", "frozenset", "slice", "tuple", "list", "dict", "bytearray")}
)


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the exact (module, name) pairs it is given, and nothing else."""

    def __init__(self, file: io.BufferedIOBase, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:  # a dotted name is never on the list
            raise pickle.UnpicklingError(f"global '{module}' '{name}' is not allowed")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def unpickle(data: bytes, allowed: frozenset[tuple[str, str]]) -> Any:
    """Unpickle `data` resolving only `allowed` globals; any malformed or refused pickle raises UnpicklingError."""
    return _load_pickle(AllowListUnpickler(io.BytesIO(data), allowed))


def _load_pickle(unpickler: pickle.Unpickler) -> Any:
    try:
        return unpickler.load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed input raises anything from EOFError to TypeError
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from None


def plain_name(name: object, where: object, what: str = "file") -> str:
    """`name` if it is a plain name inside a directory (no path, no NUL): a file from others names no other place."""
    if not isinstance(name, str) or "/" in name or "\\" in name or "\0" in name or name in ("", ".", ".."):
        raise UserError(f"{where}: names {name!r}, not a {what} inside the directory (a plain name, no path)")
    return name


def read_dcp_metadata(directory: Path) -> Metadata:
    """A DCP directory's `.metadata`, unpickled with the allow-list, every tensor and storage location checked."""
    path = Path(directory) / ".metadata"
    try:
        md = unpickle(path.read_bytes(), DCP_METADATA_GLOBALS)
    except (OSError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {directory}: DCP metadata is missing or unreadable ({e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise UserError(f"checkpoint {directory}: .metadata does not hold DCP metadata ({type(md).__name__})")
    _check_storage(Path(directory), md.storage_data)
    for key, entry in md.state_dict_metadata.items():
        _check_entry(f"checkpoint {directory}: .metadata entry {key!r}", key, entry, md.storage_data)
    return md


def _check_storage(directory: Path, storage: Any) -> None:
    """Every stored item lies in a file of this directory, inside its size (a cut or foreign file fails here)."""
    if not isinstance(storage, dict):
        raise UserError(f"checkpoint {directory}: .metadata has no storage table")
    sizes: dict[str, int] = {}
    for item in storage.values():
        where = plain_name(getattr(item, "relative_path", None), f"checkpoint {directory}: .metadata storage")
        offset, length = getattr(item, "offset", None), getattr(item, "length", None)
        if not (_is_count(offset) and _is_count(length)):
            raise UserError(f"checkpoint {directory}: .metadata has a bad offset/length for {where}")
        if where not in sizes:
            try:
                sizes[where] = (directory / where).stat().st_size
            except OSError:
                raise UserError(f"checkpoint {directory}: shard file {where} is missing (incomplete)") from None
        if offset + length > sizes[where]:
            raise UserError(
                f"checkpoint {directory}: {where} has {sizes[where]} bytes, the metadata needs {offset + length} "
                "(a truncated or incomplete checkpoint)"
            )


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _counts(value: object, rank: int | None = None) -> tuple[int, ...] | None:
    """`value` as a tuple of non-negative ints (of length `rank` when given), else None."""
    if not isinstance(value, tuple | list) or not all(_is_count(v) for v in value):
        return None
    return tuple(value) if rank is None or len(value) == rank else None


def _check_entry(where: str, key: object, entry: object, storage: dict) -> None:
    """A tensor entry is a well-formed box tiled exactly by its chunks, each stored: no byte of it is left unread."""
    if isinstance(entry, BytesStorageMetadata):
        return
    if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
        raise UserError(f"{where}: expected a tensor or bytes entry, got {type(entry).__name__}")
    size = _counts(entry.size)
    if size is None:
        raise UserError(f"{where}: size {entry.size!r} is not a list of non-negative ints")
    if not isinstance(entry.properties, TensorProperties) or not isinstance(entry.properties.dtype, torch.dtype):
        raise UserError(f"{where}: properties {entry.properties!r} is not a TensorProperties with a torch dtype")
    if not isinstance(entry.chunks, list):
        raise UserError(f"{where}: chunks {entry.chunks!r} is not a list of chunks")
    boxes = [_chunk_box(where, chunk, size) for chunk in entry.chunks]
    for offsets, _ in boxes:
        if MetadataIndex(key, offsets) not in storage:
            raise UserError(f"{where}: chunk at {list(offsets)} has no storage entry (an incomplete checkpoint)")
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    if covered != math.prod(size):
        raise UserError(f"{where}: chunks hold {covered} values, the tensor {list(size)} has {math.prod(size)}")
    _check_disjoint(where, boxes)


def _chunk_box(where: str, chunk: object, size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A chunk's (offsets, sizes), checked to lie inside the tensor."""
    offsets = _counts(getattr(chunk, "offsets", None), len(size))
    sizes = _counts(getattr(chunk, "sizes", None), len(size))
    if not isinstance(chunk, ChunkStorageMetadata) or offsets is None or sizes is None:
        raise UserError(f"{where}: a chunk needs {len(size)} non-negative offsets and sizes, got {chunk!r}")
    if any(o + n > s for o, n, s in zip(offsets, sizes, size)):
        raise UserError(f"{where}: chunk at {list(offsets)} of size {list(sizes)} lies outside {list(size)}")
    return offsets, sizes


def _check_disjoint(where: str, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """No two chunks share a value. A sweep along the dim with the most distinct offsets: each chunk is compared
    only with the chunks still open along it, so thousands of chunks (ZeRO's several per rank) stay fast."""
    boxes = [b for b in boxes if all(b[1])]  # an empty chunk holds nothing
    if len(boxes) < 2:
        return
    dim = max(range(len(boxes[0][0])), key=lambda d: len({offsets[d] for offsets, _ in boxes}))
    open_boxes: list[tuple[int, int]] = []  # (end along dim, index into boxes)
    for i in sorted(range(len(boxes)), key=lambda i: boxes[i][0][dim]):
        offsets, sizes = boxes[i]
        while open_boxes and open_boxes[0][0] <= offsets[dim]:
            heapq.heappop(open_boxes)
        for _, j in open_boxes:
            other, other_sizes = boxes[j]
            if all(o < p + m and p < o + n for o, n, p, m in zip(offsets, sizes, other, other_sizes)):
                raise UserError(f"{where}: chunks at {list(other)} and {list(offsets)} overlap")
        heapq.heappush(open_boxes, (offsets[dim] + sizes[dim], i))


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with checked metadata, refusing pickled (bytes) entries: we load tensors only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_dcp_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: Any, planner: Any) -> Any:
        pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:  # DCP unpickles these with torch.load(weights_only=False)
            raise UserError(f"checkpoint {self.path}: refusing to unpickle the non-tensor entries {pickled[:3]}")
        return super().read_data(plan, planner)


class Placeholder:
    """Stands in for a foreign class a `.pt` file names: built from anything, keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # items and elements a container subclass is built from
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


REBUILT = {"argparse.Namespace": argparse.Namespace, "types.SimpleNamespace": types.SimpleNamespace}


def load_torch_file(path: Path, only: frozenset[str] | None = None) -> Any:
    """A `.pt` file through torch's weights-only unpickler; tensors memory-mapped, so opening reads no weights.

    Megatron files also pickle objects we never use (numpy RNG state, Megatron enums, TE extra state):
    each is bound to `Placeholder`, so unpickling it constructs nothing of the file's choosing. With `only`,
    a file naming any other foreign global (`module.name`) is refused: for formats whose few classes are known.
    """
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return _load_torch(lambda: str(path), str(path), only, mmap=True)


def load_torch_bytes(data: bytes, where: str) -> Any:
    """A torch.save'd object held inside another file (a DCP entry), read as `load_torch_file` reads a file."""
    return _load_torch(lambda: io.BytesIO(data), where, None, mmap=False)


def _load_torch(source: Callable[[], Any], where: str, only: frozenset[str] | None, mmap: bool) -> Any:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source())
        refused = sorted(set(names) - only) if only is not None else []
        if refused:
            raise UserError(f"{where}: refusing to unpickle {refused[0]} (not a class this format holds)")
        _check_records(source(), where)
        allowed = [REBUILT[n] if n in REBUILT else (Placeholder, n) for n in names]
        with torch.serialization.safe_globals(allowed):
            return torch.load(source(), map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: not a readable torch file ({first})") from None


def _storage_itemsizes() -> dict[str, int]:
    """Storage class name (as torch.save pickles it) -> bytes per element."""
    with warnings.catch_warnings():  # the typed storage classes are deprecated; their dtypes are what we need
        warnings.simplefilter("ignore")
        typed = {n: getattr(getattr(torch, n), "dtype", None) for n in dir(torch) if n.endswith("Storage")}
    return {n: d.itemsize for n, d in typed.items() if isinstance(d, torch.dtype)} | {"UntypedStorage": 1}


_STORAGE_ITEMSIZE = _storage_itemsizes()


class _StorageType(int):
    """A storage class named in data.pkl, as its bytes per element."""


class _Dict(dict):
    """OrderedDict's stand-in: a state dict pickles attributes (`_metadata`) after its items."""

    def __setstate__(self, state: Any) -> None:
        pass


class _RecordScanner(pickle.Unpickler):
    """Reads data.pkl for its storage records alone: every global but a storage class is the inert Placeholder,
    so nothing of the file's choosing is built. `records`: record key -> bytes its storage needs."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file)
        self.records: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_ITEMSIZE:
            return _StorageType(_STORAGE_ITEMSIZE[name])
        return _Dict if (module, name) == ("collections", "OrderedDict") else Placeholder

    def persistent_load(self, pid: Any) -> Any:
        _, kind, key, _, numel = pid if isinstance(pid, tuple) and len(pid) == 5 else (None,) * 5
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and type(numel) is int and numel >= 0):
            raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
        self.records[key] = numel * kind
        return Placeholder()


def _check_records(file: Any, where: str) -> None:
    """Every storage record of a torch zip file holds exactly the bytes its storage needs, uncompressed: torch's
    memory-mapped load reads them unchecked, so a cut record would load the next one's bytes as weights."""
    if not zipfile.is_zipfile(file):
        return  # the legacy format (bytes only): torch reads each storage's size from the stream
    with zipfile.ZipFile(file) as z:
        prefix = z.namelist()[0].split("/")[0] if z.namelist() else ""
        scanner = _RecordScanner(io.BytesIO(z.read(f"{prefix}/data.pkl")))
        _load_pickle(scanner)
        for key, nbytes in scanner.records.items():
            info = z.getinfo(f"{prefix}/data/{key}")
            if info.file_size != nbytes or info.compress_type != zipfile.ZIP_STORED:
                raise UserError(
                    f"{where}: storage record data/{key} holds {info.file_size} bytes"
                    f"{'' if info.compress_type == zipfile.ZIP_STORED else ' compressed'}, its tensor needs "
                    f"{nbytes} uncompressed (a truncated or altered file)"
                )


def read_dcp_bytes(directory: Path, key: str) -> bytes | None:
    """The stored bytes of DCP's non-tensor entry `key` (None if the checkpoint has none), where the checked
    metadata puts them; nothing unpickled. An entry DCP stored transformed (compressed, extensions) is refused."""
    md = read_dcp_metadata(directory)
    info = next((v for k, v in md.storage_data.items() if getattr(k, "fqn", None) == key), None)
    if info is None:
        return None
    if getattr(info, "transform_descriptors", None):
        raise UserError(f"checkpoint {directory}: entry {key} is stored transformed ({info.transform_descriptors})")
    with open(Path(directory) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)
