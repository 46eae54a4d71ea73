"""DeepSpeed checkpoints of HF models (`engine.save_checkpoint`, as HF Trainer, accelerate and plain runs
leave them), read at ZeRO stage 0-3 and any DP size, written in the stage-0 layout.

A source is a run directory (its `latest` names the tag) or one `global_stepN/` directory; the HF
`config.json` lies beside the tag directory or one level up (else `--hf-config DIR`). Weights are the
fp32 masters in the optimizer files when there are any, as DeepSpeed's zero_to_fp32.py reads them
(reimplemented here, one tensor at a time from memory-mapped files):

- ZeRO 1/2: param group g is one flat vector, every rank's `single_partition_of_fp32_groups[g]` end to
  end; its parameters lie in `param_shapes[g]` order, each followed by its `param_alignment_paddings`.
- ZeRO 3: every parameter is padded to a multiple of the DP size and split evenly: rank r's
  `fp32_flat_groups`, end to end, hold elements [r*k, (r+1)*k) of each parameter in `param_shapes` order.
- stage 0 (no optimizer files): `mp_rank_00_model_states.pt`'s `module`, in the training dtype.

Adam's `exp_avg` / `exp_avg_sq` are flat vectors laid out exactly like the fp32 masters, so the same
places read them. Every file is a pickle: it is loaded by torch's weights-only unpickler, and a file
naming any global besides the few DeepSpeed classes in `ALLOWED` (bound to inert stand-ins) is refused.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatronlite.config import read_text
from megatronlite.convert import hf
from megatronlite.convert.fields import COUNT, COUNTS, OBJECT, TEXT_MAP, TEXTS, Kind, check, require
from megatronlite.convert.mapping import Get
from megatronlite.convert.model_state import (
    Checkpoint,
    Options,
    TrainingState,
    from_store,
    output_dtype,
    run_config,
    side_files,
    tensors_only,
)
from megatronlite.convert.parking import Staging
from megatronlite.errors import UserError
from megatronlite.untrusted import load_torch_file, plain_name

# the only foreign classes DeepSpeed's files pickle (read from 0.19.8's files; none of their values is used)
ALLOWED = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # stages 0-2: the module and its metadata
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"
OPTIM_STATES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # bf16_zero_pp_rank_* with bf16 at stage 0
MOMENTS = ("exp_avg", "exp_avg_sq")
WRITTEN_VERSION = "0.19.8"  # ds_version of what `write` makes, the release it was tested against


@dataclass(frozen=True)
class DeepSpeedOptions(Options):
    """Options plus where the HF config.json is when it is not beside the checkpoint (`--hf-config`)."""

    hf_config: Path | None = None


def _load(path: Path) -> dict:
    obj = load_torch_file(path, only=ALLOWED)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a DeepSpeed checkpoint file (it holds a {type(obj).__name__}, not a dict)")
    return obj


def tag_dir(path: Path) -> Path:
    """The `global_stepN` directory a run directory's `latest` names, or `path` itself."""
    if (path / LATEST).is_file():
        tag = read_text(path / LATEST, "DeepSpeed tag file").strip()
        path = path / plain_name(tag, path / LATEST, "checkpoint directory")
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise UserError(f"{path}: no DeepSpeed checkpoint (a run directory with `latest`, or a global_stepN directory)")
    others = sorted(p.name for p in path.glob("*model_states.pt") if "mp_rank_00" not in p.name)
    if others:  # Megatron-DeepSpeed's tensor- or pipeline-parallel files
        raise UserError(f"{path}: {others[0]}: model- or pipeline-parallel DeepSpeed checkpoints are not supported")
    return path


def _config_dir(step_dir: Path, options: Options) -> Path:
    given = getattr(options, "hf_config", None)
    for directory in [given] if given else [step_dir.parent, step_dir.parent.parent]:
        if (directory / "config.json").is_file():
            return directory
    where = given or f"{step_dir.parent} or {step_dir.parent.parent}"
    raise UserError(f"{where}: no HF config.json; point to the model's with --hf-config DIR")


class _Flat:
    """The flat fp32 vectors of every rank's optimizer file and where each parameter lies in them."""

    def __init__(self, files: list[Path], param_shapes: list, where: Path) -> None:
        self.where = where
        states = [require(_load(f), "optimizer_state_dict", f, OBJECT) for f in files]
        count = states[0].get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count != len(files):
            raise UserError(f"{where}: the optimizer states are split over {count} ranks, {len(files)} files are here")
        self.zero3 = "fp32_flat_groups" in states[0]
        key, base = (
            ("fp32_flat_groups", "optimizer_state_dict")
            if self.zero3
            else ("single_partition_of_fp32_groups", "base_optimizer_state")
        )
        self.vectors = {"fp32": [_tensors(s, key, f) for s, f in zip(states, files)]}
        adam = [s.get(base, {}).get("state", {}) for s in states]
        groups = range(len(self.vectors["fp32"][0]))
        self.optimizer_steps = 0
        if all(isinstance(a, dict) and all(isinstance(a.get(g), dict) for g in groups) for a in adam):
            for kind in MOMENTS:
                self.vectors[kind] = [[a[g].get(kind) for g in groups] for a in adam]
            self.optimizer_steps = _step(adam[0][0].get("step", 0), files[0])
        for kind, per_rank in self.vectors.items():
            for rank, vectors in enumerate(per_rank):
                if [getattr(v, "shape", None) for v in vectors] != [v.shape for v in self.vectors["fp32"][rank]]:
                    raise UserError(f"{files[rank]}: {kind} does not match the fp32 partitions' shapes")
        paddings = _paddings(states[0].get("param_alignment_paddings"), param_shapes, files[0])
        self.places = self._zero3(param_shapes) if self.zero3 else self._zero12(param_shapes, paddings)

    def _zero12(self, param_shapes: list, paddings: list[list[int]]) -> dict:
        places = {}
        for g, shapes in enumerate(param_shapes):
            offset = 0
            for (name, shape), padding in zip(shapes.items(), paddings[g]):
                places[name] = ([(g, offset, math.prod(shape))], tuple(shape))
                offset += math.prod(shape) + padding
            held = sum(ranks[g].numel() for ranks in self.vectors["fp32"])
            align = 2 * len(self.vectors["fp32"])  # DeepSpeed pads each group to a multiple of 2 x DP
            if -(-offset // align) != -(-held // align):
                raise UserError(f"{self.where}: param group {g} holds {held} values, its parameters need {offset}")
        return places

    def _zero3(self, param_shapes: list) -> dict:
        ranks, offset, places = len(self.vectors["fp32"]), 0, {}
        for shapes in param_shapes:
            for name, shape in shapes.items():
                share = -(-math.prod(shape) // ranks)
                places[name] = ([(r, offset, share) for r in range(ranks)], tuple(shape))
                offset += share
        held = sum(v.numel() for v in self.vectors["fp32"][0])
        if offset != held:
            raise UserError(f"{self.where}: each rank holds {held} values, the parameters' shares need {offset}")
        return places

    def get(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """Parameter `name`'s fp32 master (or Adam state `kind`), whole."""
        spans, shape = self.places[name]
        per_rank = self.vectors[kind]
        pieces = []
        for index, start, length in spans:  # ZeRO 1/2: (group, ...) over all ranks; ZeRO 3: (rank, ...) over its groups
            segments = [ranks[index] for ranks in per_rank] if not self.zero3 else per_rank[index]
            pieces += _span(segments, start, length)
        return torch.cat(pieces)[: math.prod(shape)].view(shape).float()


PARAM_SHAPES = Kind(
    "a list of {name: shape} per param group, each shape a list of integers >= 0",
    lambda v: (
        isinstance(v, list)
        and all(isinstance(g, dict) and all(isinstance(n, str) and COUNTS.test(s) for n, s in g.items()) for g in v)
    ),
)


def _paddings(value: object, param_shapes: list, where: Path) -> list[list[int]]:
    """ZeRO 1/2's padding after each parameter: integers >= 0, one per parameter (none given: no padding)."""
    counts = [len(shapes) for shapes in param_shapes]
    if value is None:
        return [[0] * n for n in counts]
    what = f"a list per param group of one integer >= 0 per parameter ({counts} of them)"
    ok = isinstance(value, list) and [len(g) if isinstance(g, list) else None for g in value] == counts
    return check(value, Kind(what, lambda v: ok and all(COUNTS.test(g) for g in v)), where, "param_alignment_paddings")


def _step(value: object, where: Path) -> int:
    """Adam's step count: an integer >= 0, or a tensor holding one (torch's optimizers keep it as a tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and float(value).is_integer():
        value = int(value)
    return check(value, COUNT, where, "the Adam state's step")


def _tensors(state: dict, key: str, where: Path) -> list[torch.Tensor]:
    vectors = state.get(key)
    if not isinstance(vectors, list) or not all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in vectors):
        raise UserError(f"{where}: {key} is missing or not a list of flat tensors")
    return vectors


def _span(segments: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Elements [start, start + length) of `segments` laid end to end, as views."""
    out = []
    for segment in segments:
        n = segment.numel()
        if length and start < n:
            take = min(length, n - start)
            out.append(segment[start : start + take])
            start, length = 0, length - take
        else:
            start -= n
    if length:
        raise UserError("a parameter lies past the end of the optimizer states' flat partitions (a cut checkpoint)")
    return out


class DeepSpeedStore:
    """A DeepSpeed checkpoint's tensors by their HF names: fp32 masters, or the module at stage 0."""

    def __init__(self, step_dir: Path) -> None:
        self.where = step_dir
        zero3 = sorted(step_dir.glob(ZERO3_MODEL_STATES))
        model_file = zero3[0] if zero3 else step_dir / MODEL_STATES
        model = _load(model_file)
        self.module = tensors_only(require(model, "module", model_file, OBJECT), model_file, "module")
        self.step = model.get("global_steps") if isinstance(model.get("global_steps"), int) else 0
        if model.get("frozen_param_shapes"):
            raise UserError(f"{model_file}: frozen parameters are not supported (convert a model trained whole)")
        shared = check(model.get("shared_params") or {}, TEXT_MAP, model_file, "shared_params")
        optim = sorted(step_dir.glob(OPTIM_STATES), key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])
        self.flat: _Flat | None = None
        if optim:
            param_shapes = check(model.get("param_shapes"), PARAM_SHAPES, model_file, "param_shapes")
            self.flat = _Flat(optim, param_shapes, step_dir)
            names = [*self.flat.places, *require(model, "buffer_names", model_file, TEXTS)]
            self.aliases = {alias: source for alias, source in shared.items() if source in self.flat.places}
            self.names = names + list(self.aliases)
        elif zero3:
            raise UserError(f"{step_dir}: a ZeRO-3 checkpoint without its *_optim_states.pt files (incomplete)")
        else:
            self.aliases, self.names = {}, list(self.module)

    def keys(self) -> list[str]:
        return self.names

    def meta(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if self.flat is not None and name in self.flat.places:
            return torch.empty(self.flat.places[name][1], device="meta")
        return torch.empty_like(self.module[name], device="meta")

    def get(self, name: str, kind: str = "fp32") -> torch.Tensor:
        name = self.aliases.get(name, name)
        if self.flat is not None and name in self.flat.places:
            return self.flat.get(name, kind)
        return self.module[name]  # a buffer, or every tensor at stage 0


class _MomentStore:
    """One Adam state of a DeepSpeed checkpoint as a store, so the HF mapping renames it like the weights."""

    def __init__(self, store: DeepSpeedStore, kind: str) -> None:
        self.store, self.kind, self.where = store, kind, store.where
        self.keys, self.meta = store.keys, store.meta

    def get(self, name: str) -> torch.Tensor:
        return self.store.get(name, self.kind)


def read(path: Path, options: Options) -> Checkpoint:
    step_dir = tag_dir(path)
    config_dir = _config_dir(step_dir, options)
    raw, family = hf.read_config(config_dir)
    model = family.model_config(raw, config_dir / "config.json")
    store = DeepSpeedStore(step_dir)
    mapping = family.mapping(model)
    ignored = functools.partial(family.ignored, model)
    ckpt = from_store(run_config(model, step_dir.parent.name), store, mapping, ignored, side_files(config_dir))
    flat = store.flat
    if flat is None or "exp_avg" not in flat.vectors:
        return ckpt
    moments = {kind: _renamed(mapping.ours, _MomentStore(store, kind).get) for kind in MOMENTS}
    ckpt.training = TrainingState(moments, store.step, flat.optimizer_steps)
    return ckpt


def _renamed(ours: Callable[[str, Get], torch.Tensor], get_theirs: Get) -> Get:
    return lambda name: ours(name, get_theirs)


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    """A stage-0 checkpoint (`latest`, `global_step0/mp_rank_00_model_states.pt`, weights only) and config.json:
    `engine.load_checkpoint(DST, load_module_only=True)` of an HF model at ZeRO 0-2 loads it."""
    model = ckpt.cfg.model
    family = hf.family_for(model)
    dtype = output_dtype(ckpt, options)
    mapping = family.mapping(model)
    step_dir = dst / "global_step0"
    step_dir.mkdir(parents=True)
    with Staging(dst) as staging:
        module = OrderedDict((n, staging.put(t.to(dtype))) for n, t in mapping.stream_theirs(ckpt.get))
        states = {
            "module": module,
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": [OrderedDict((n, t.shape) for n, t in module.items())],
            "frozen_param_shapes": None,
            "shared_params": {},
            "frozen_param_fragments": None,
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": 0,
            "global_samples": 0,
            "dp_world_size": 1,
            "mp_world_size": 1,
            "ds_version": WRITTEN_VERSION,
        }
        torch.save(states, step_dir / MODEL_STATES)
    hf_config = {**family.hf_config(model), "dtype": hf.DTYPE_NAMES[dtype], "torch_dtype": hf.DTYPE_NAMES[dtype]}
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (dst / LATEST).write_text(step_dir.name)
