"""Checkpoints as plain global tensors, one at a time: what converters read and write.

A weights-only checkpoint (meta `weights_only: true`) holds the `model.*` tensors and no
optimizer state; `train` with `checkpoint.load: PATH` starts from it at step 0 with a fresh
optimizer. Names are the global names of `megatronlite.checkpoint.views` (fused parts split:
`layers.0.mlp.fc1.weight.gate`), shapes are unpadded.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import ADAM_STATES, model_pieces
from megatronlite.config import Config
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel
from megatronlite.parallel.mesh import Mesh
from megatronlite.untrusted import SafeReader
from megatronlite.version import versions


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Global name (without `model.`) -> shape of every weight a checkpoint of `cfg` holds."""
    return {p.key.removeprefix("model."): p.global_shape for p in _weight_pieces(_meta_model(cfg))}


def expected_keys(cfg: Config, weights_only: bool) -> set[str]:
    """Every tensor key a checkpoint of `cfg` holds over all its ranks, the RNG states aside: the weights (`model.*`),
    and, but for a weights-only one, Adam's moments of each (`optim.*`) and the MoE layers' selection biases
    (`state.*`)."""
    model = _meta_model(cfg)
    keys = {p.key for p in _weight_pieces(model)}
    if weights_only:
        return keys
    keys |= {f"optim.{state}.{key.removeprefix('model.')}" for state in ADAM_STATES for key in keys}
    return keys | {f"state.{name}" for name, _ in model.named_buffers() if name.endswith(".mlp.bias")}


def _meta_model(cfg: Config) -> GPTModel:
    with torch.device("meta"):
        return GPTModel(cfg.model)


def _weight_pieces(model: GPTModel) -> list:
    return model_pieces(dict(model.named_parameters()), Mesh(), for_save=True)


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

    Every expected tensor must be given with its exact shape.
    """
    expected = expected_shapes(cfg)
    got = {}
    for name, t in tensors:
        if name not in expected:
            raise ValueError(f"unexpected tensor {name}")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
        got[name] = t
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing[:5])}")
    return write_checkpoint_lazily(run_dir, cfg, got.__getitem__, step)


def write_checkpoint_lazily(
    run_dir: Path,
    cfg: Config,
    load: Callable[[str], torch.Tensor],
    step: int = 0,
    moments: dict[str, Callable[[str], torch.Tensor]] | None = None,
    optimizer_steps: int = 0,
    consumed_samples: int = 0,
) -> Path:
    """`write_checkpoint`, asking `load(name)` for each tensor only when DCP writes it.

    With Adam's `moments` ({"exp_avg": load, "exp_avg_sq": load}), its step count and the data position
    (`consumed_samples`), the checkpoint is a training one at `step` (what `train` resumes, optimizer and
    data position included), else weights-only.
    DCP's FileSystemWriter (read in torch 2.13) keeps a reference to every tensor it has written until
    the file is closed, and there is one file: to hold one tensor in memory at a time, `load` should
    return file-backed tensors (see megatronlite.convert.parking).
    """
    sources = {"model": load, **{f"optim.{kind}": get for kind, get in (moments or {}).items()}}
    chunks = [
        LazyChunk(f"{prefix}.{name}", shape, (0,) * len(shape), shape, torch.float32, functools.partial(get, name))
        for prefix, get in sources.items()
        for name, shape in expected_shapes(cfg).items()
    ]
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = store.prepare(root, step)
    save_chunks(tmp, chunks)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_yaml)
    meta = {
        "step": step,
        "consumed_samples": consumed_samples,
        # a training checkpoint's RNG states are re-derived from the seed (never a run's layout); the source's steps
        # without an Adam update (Megatron's skipped iterations) count as skipped ones, so that the trainer's own
        # count (step - skips) stays Adam's when it saves next
        **(
            {"optimizer_steps": optimizer_steps, "nonfinite_skips": max(0, step - optimizer_steps), "loss_scale": None}
            if moments
            else {}
        ),
        **({} if moments else {"weights_only": True}),
        "layout": {"tensor": 1, "pipeline": 1, "data": 1, "world_size": 1},
        "model": cfg.to_dict()["model"],
        "versions": versions(),
    }
    return store.commit(root, step, meta, config_yaml, keep=0, keep_every=0)


@dataclass(frozen=True)
class LazyChunk:
    """One stored piece of a global tensor; `load()` makes its value only when DCP writes it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from shapes alone, so DCP's writer pulls one chunk at a time instead of a whole state dict."""

    def __init__(self, chunks: list[LazyChunk], objects: dict[str, object]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        for c in self.chunks.values():
            whole = c.shape == c.global_shape
            items.append(
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offsets)),
                    type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.shape)),
                        properties=TensorProperties(dtype=c.dtype),
                        size=torch.Size(c.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(self.objects[write_item.index.fqn], buffer)
            return buffer
        c = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        value = c.load()
        if tuple(value.shape) != c.shape:
            raise ValueError(f"{c.key} at {list(c.offsets)}: got shape {list(value.shape)}, planned {list(c.shape)}")
        return value.detach().to(c.dtype).contiguous()


def save_chunks(directory: Path, chunks: list[LazyChunk], objects: dict[str, object] | None = None) -> None:
    """Write a DCP checkpoint of lazily made chunks, plus small pickled `objects` (single process).
    A UserError raised while making a chunk (a bad source file) reaches the caller as itself."""
    try:
        writer = dcp.FileSystemWriter(str(directory))
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects or {}), no_dist=True)
    except CheckpointException as e:
        for cause, _ in e.failures.values():
            if isinstance(cause, UserError):
                raise cause from None
        raise


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads one box (offsets, shape) of one stored tensor, whatever chunks it was saved in."""

    def __init__(self, key: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.out = key, offsets, out

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(torch.Size(self.offsets), self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [box]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view


def read_chunk(
    directory: Path, key: str, offsets: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The box `shape` at `offsets` of stored tensor `key` (single process; memory: the box)."""
    out = torch.empty(shape, dtype=dtype)
    reader = SafeReader(str(directory))
    try:
        dcp.load({}, storage_reader=reader, planner=_ChunkLoadPlanner(key, tuple(offsets), out), no_dist=True)
    except CheckpointException as e:
        raise store.unreadable(directory, f"tensor {key}", e) from None
    return out
