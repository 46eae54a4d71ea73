"""Megatron's legacy `torch` format: one file per (TP, PP) rank, `mp_rank_TT[_PPP]/model_optim_rng.pt`,
a dict of `args`, `iteration`, `checkpoint_version` and `model` (`model0`, `model1`, ... with
virtual pipeline stages), beside optimizer and RNG state we do not read.

A training checkpoint's optimizer state is refused unless --weights-only leaves it behind: the
non-distributed optimizer's `optimizer.state` is indexed by parameter position in param groups
built by megatron-core's grouping rules (version- and flag-dependent: weight-decay and LR overrides),
the distributed optimizer's (`distrib_optim.pt`) by offset in its gradient buffers; neither names a
tensor, so which moment belongs to which weight cannot be read from the file itself.

A rank's `model` is its TP shard of its stage's layers, numbered from 0 within the stage.
Column-parallel weights and biases are split on dim 0 (SwiGLU's fc1 per rank is [gate_r; up_r]), row-parallel
ones on dim 1, the rest replicated. Reading memory-maps every rank file and joins a global tensor
from its shards when asked; writing splits each global tensor as it is made and parks the shards
in memory-mapped files until each rank's file is saved.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from megatronlite.convert.mapping import Mapping
from megatronlite.convert.megatron_names import LAYER
from megatronlite.convert.model_state import Checkpoint, refuse
from megatronlite.convert.parking import Staging
from megatronlite.errors import UserError
from megatronlite.untrusted import load_torch_file

FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"  # the distributed optimizer's state, beside FILE
COLUMN_PARALLEL = (
    "word_embeddings.weight",
    "output_layer.weight",
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
)
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
# megatron-core's local (non-TE) layers name their norms apart from the linear layer they precede
LOCAL_NORMS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
UNEVEN = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "pipeline_model_parallel_layout")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _tp_dim(name: str) -> int | None:
    if name.endswith(COLUMN_PARALLEL):
        return 0
    return 1 if name.endswith(ROW_PARALLEL) else None


def _is_glu_fc1(name: str, glu: bool) -> bool:
    return glu and name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def join(name: str, shards: list[torch.Tensor], glu: bool) -> torch.Tensor:
    """The global tensor from its TP shards (meta shards give its shape)."""
    if _is_glu_fc1(name, glu):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    dim = _tp_dim(name)
    return shards[0] if dim is None else torch.cat(shards, dim)


def split(name: str, t: torch.Tensor, tp: int, glu: bool) -> list[torch.Tensor]:
    """The inverse of `join`."""
    if _is_glu_fc1(name, glu):
        gate, up = t.chunk(2)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    dim = _tp_dim(name)
    return [t] * tp if dim is None else list(t.chunk(tp, dim))


def _stage_name(name: str, offset: int, to_global: bool) -> str:
    """Move a layer name between stage-local and global numbering."""
    layer = LAYER.fullmatch(name)
    if layer is None:
        return name
    return f"decoder.layers.{int(layer[1]) + (offset if to_global else -offset)}.{layer[2]}"


def _norm_name(name: str, local: bool) -> str:
    """TE norm names <-> local-layer norm names."""
    for local_part, te_part in LOCAL_NORMS.items():
        old, new = (te_part, local_part) if local else (local_part, te_part)
        if f".{old}" in name:
            return name.replace(f".{old}", f".{new}")
    return name


def _first_file(directory: Path) -> Path:
    ranks = sorted(directory.glob("mp_rank_*"))
    if not ranks:
        raise UserError(f"{directory}: no mp_rank_*/{FILE} (legacy format) and no metadata.json (torch_dist)")
    return ranks[0] / FILE


def load_args(directory: Path) -> dict:
    path = _first_file(directory)
    state = load_torch_file(path)
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{path}: no Megatron-LM args; they hold the model's shape, needed to convert it")
    return vars(args)


class LegacyStore:
    def __init__(self, directory: Path, args: dict) -> None:
        self.where = directory
        tp = args.get("tensor_model_parallel_size") or 1
        pp = args.get("pipeline_model_parallel_size") or 1
        vpp = args.get("virtual_pipeline_model_parallel_size") or 1
        for key in UNEVEN:
            if args.get(key):
                refuse(directory, f"an uneven pipeline split (args.{key})", "even pipeline stages")
        per_stage, leftover = divmod(args["num_layers"], pp * vpp)
        if leftover:
            refuse(directory, f"{args['num_layers']} layers over {pp * vpp} pipeline stages", "even pipeline stages")
        self.glu = bool(args.get("swiglu"))
        self.shards: dict[str, list[torch.Tensor | None]] = defaultdict(lambda: [None] * tp)
        self.optimizer_file: Path | None = None  # the first rank file holding optimizer state
        for p in range(pp):
            for t in range(tp):
                path = directory / rank_dir(t, p, pp) / FILE
                state = load_torch_file(path)
                if self.optimizer_file is None and _holds_optimizer(state, path):
                    self.optimizer_file = path
                chunks = ["model"] if vpp == 1 else [f"model{v}" for v in range(vpp)]
                for v, chunk in enumerate(chunks):
                    model = state.get(chunk) if isinstance(state, dict) else None
                    if not isinstance(model, dict):
                        raise UserError(f"{path}: no '{chunk}' state dict")
                    if any(k.startswith("language_model.") for k in model):
                        refuse(path, "the pre-megatron-core layout (language_model.*)", "megatron-core GPT models")
                    offset = (v * pp + p) * per_stage
                    for key, value in model.items():
                        if isinstance(value, torch.Tensor):
                            self.shards[_norm_name(_stage_name(key, offset, True), local=False)][t] = value
        for name, parts in self.shards.items():
            if any(part is None for part in parts):
                raise UserError(f"{directory}: tensor {name} is missing from TP rank {parts.index(None)}")

    def keys(self) -> list[str]:
        return list(self.shards)

    def meta(self, name: str) -> torch.Tensor:
        return join(name, [torch.empty_like(s, device="meta") for s in self.shards[name]], self.glu)

    def get(self, name: str) -> torch.Tensor:
        return join(name, self.shards[name], self.glu)


def _holds_optimizer(state: object, path: Path) -> bool:
    return bool(isinstance(state, dict) and state.get("optimizer")) or (path.parent / DISTRIB_OPTIM).is_file()


def open_store(directory: Path, args: dict) -> LegacyStore:
    return LegacyStore(directory, args)


def optimizer_state(directory: Path, args: dict, store: LegacyStore) -> None:
    """Never carried (see the module doc): a file holding optimizer state is refused with one line."""
    if store.optimizer_file is not None:
        raise UserError(
            f"{store.optimizer_file}: holds Megatron's optimizer state in the legacy torch format, indexed by "
            "parameter position (or gradient-buffer offset), not by tensor name, so megatronlite cannot tell which "
            "moment belongs to which weight: convert it to torch_dist with Megatron-LM (--ckpt-convert-format "
            "torch_dist --ckpt-convert-save DIR --dist-ckpt-optim-fully-reshardable) and convert that, or pass "
            "--weights-only to convert the weights alone"
        )


def _placements(name: str, args: argparse.Namespace) -> list[tuple[int, str]]:
    """(pipeline stage, stage-local name) of a global tensor; a tied embedding is also the last stage's output layer."""
    pp, per_stage = args.pipeline_model_parallel_size, args.num_layers // args.pipeline_model_parallel_size
    layer = LAYER.fullmatch(name)
    if layer is not None:
        stage = int(layer[1]) // per_stage
        return [(stage, _stage_name(name, stage * per_stage, to_global=False))]
    if not name.startswith("embedding."):
        return [(pp - 1, name)]
    tied = not args.untie_embeddings_and_output_weights
    copy = pp > 1 and tied and name == "embedding.word_embeddings.weight"
    return [(0, name)] + ([(pp - 1, "output_layer.weight")] if copy else [])


def _extra_states(model: dict, last_stage: bool, local: bool) -> dict[str, None]:
    """The `_extra_state` entries megatron-core's modules expect in a strict load (no FP8 state: None)."""
    weights = [k.removesuffix(".weight") for k in model if k.endswith(".weight")]
    modules = [m for m in weights if m.endswith(LINEARS)]
    if last_stage and "output_layer" not in modules:
        modules.append("output_layer")  # a tied output layer has no weight of its own, but has extra state
    if not local:
        modules += [m.replace(".linear_qkv", ".core_attention") for m in modules if m.endswith(".linear_qkv")]
    return {f"{m}._extra_state": None for m in modules}


def write(
    directory: Path, mapping: Mapping, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype, spec: str
) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    models: dict[tuple[int, int], dict] = {(t, p): {} for p in range(pp) for t in range(tp)}
    with Staging(directory) as staging:
        for name, tensor in mapping.stream_theirs(ckpt.get):
            tensor = tensor.to(dtype)
            for stage, local_name in _placements(name, args):
                stored_name = _norm_name(local_name, local=spec == "local")
                for t, shard in enumerate(split(local_name, tensor, tp, args.swiglu)):
                    models[t, stage][stored_name] = staging.put(shard.contiguous())
        for (t, p), model in models.items():
            model.update(_extra_states(model, last_stage=p == pp - 1, local=spec == "local"))
            rank = directory / rank_dir(t, p, pp)
            rank.mkdir()
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model}
            torch.save(state, rank / FILE)
