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
import importlib
import io
import os
import pickle
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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
    try:
        return AllowListUnpickler(io.BytesIO(data), allowed).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed input raises anything from EOFError to TypeError
        raise pickle.UnpicklingError(f"{type(e).__name__}: {e}") from None


def read_dcp_metadata(directory: Path) -> Metadata:
    """A DCP directory's `.metadata`, unpickled with the allow-list, every storage location checked."""
    path = Path(directory) / ".metadata"
    try:
        md = unpickle(path.read_bytes(), DCP_METADATA_GLOBALS)
    except (OSError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {directory}: DCP metadata is missing or unreadable ({e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise UserError(f"checkpoint {directory}: .metadata does not hold DCP metadata ({type(md).__name__})")
    _check_storage(Path(directory), md.storage_data)
    return md


def _check_storage(directory: Path, storage: Any) -> None:
    """Every stored item lies in a file of this directory, inside its size (a cut or foreign file fails here)."""
    if not isinstance(storage, dict):
        raise UserError(f"checkpoint {directory}: .metadata has no storage table")
    sizes: dict[str, int] = {}
    for item in storage.values():
        where = getattr(item, "relative_path", None)
        offset, length = getattr(item, "offset", None), getattr(item, "length", None)
        if not isinstance(where, str) or os.path.basename(where) != where or where in ("", ".", ".."):
            raise UserError(f"checkpoint {directory}: .metadata names a file outside the directory: {where!r}")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
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
        allowed = [REBUILT[n] if n in REBUILT else (Placeholder, n) for n in names]
        with torch.serialization.safe_globals(allowed):
            return torch.load(source(), map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: not a readable torch file ({first})") from None


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
