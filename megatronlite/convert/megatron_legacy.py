"""Megatron's legacy `torch` format: one file per (TP, PP, EP) rank, `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`
(`_PPP` with pipeline stages, `_EEE` with expert parallelism), a dict of `args`, `iteration`,
`checkpoint_version` and `model` (`model0`, `model1`, ... with virtual pipeline stages), beside optimizer and
RNG state we do not read.

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

Experts. An EP rank's file holds its E / EP experts, numbered from 0 (expert j of EP rank r is global expert
r x E / EP + j), and a copy of everything else; each expert is TP-split as a dense MLP is (Megatron-LM's expert TP
defaults to TP; another one is refused). A rank holds them in its expert module's own form: SequentialMLP's
`mlp.experts.local_experts.J.linear_fc1.weight` (what we write: megatron-core builds it unless
--moe-grouped-gemm, with local and Transformer Engine layers alike), TEGroupedMLP's `mlp.experts.linear_fc1.weightJ`
(the same tensor), or GroupedMLP's `mlp.experts.weight1` [h, J x out] (its blocks [h, out], x @ block, are our
[out, h] transposed) and `weight2` [J x f, h]. Reading turns each into megatron_names' stacked
`mlp.experts.experts.linear_fc1.weight` [E, ...] (`mapping.stacked`), the torch_dist name and layout.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from megatronlite.convert.fields import COUNT, POSITIVE, require
from megatronlite.convert.mapping import Mapping, Rule, stacked
from megatronlite.convert.megatron_names import LAYER, expert_biases
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
# an expert's tensor in a rank file: SequentialMLP's, TEGroupedMLP's, or GroupedMLP's (all local experts)
RANK_EXPERTS = re.compile(
    r"(?P<experts>decoder\.layers\.\d+\.mlp\.experts\.)"
    r"(?:local_experts\.(?P<j>\d+)\.(?P<linear>linear_fc[12]\.weight)|(?P<te>linear_fc[12])\.weight(?P<te_j>\d+)"
    r"|weight(?P<grouped>[12]))"
)
ONE_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)")
STACKED_EXPERTS = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)experts\.(.+)")
TO_TORCH_DIST = (
    "convert it to torch_dist with Megatron-LM (--ckpt-convert-format torch_dist --ckpt-convert-save DIR) and "
    "convert that"
)


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def _experts_of(name: str, t: torch.Tensor, local: int, first: int) -> list[tuple[str, torch.Tensor]] | None:
    """A rank file's expert tensor as (`...mlp.experts.local_experts.G.linear_fcN.weight`, [out, in]) per expert,
    G global (this EP rank's experts start at `first`); None for any other tensor."""
    m = RANK_EXPERTS.fullmatch(name)
    if m is None:
        return None
    if m["grouped"] is None:
        j, linear = (m["j"], m["linear"]) if m["j"] is not None else (m["te_j"], m["te"] + ".weight")
        return [(f"{m['experts']}local_experts.{first + int(j)}.{linear}", t)]
    # GroupedMLP multiplies x @ weight1.view(J, h, out)[j] and y @ weight2.view(J, f, h)[j]
    blocks = t.view(local, t.shape[0], -1) if m["grouped"] == "1" else t.view(local, -1, t.shape[1])
    linear = f"linear_fc{m['grouped']}.weight"
    return [(f"{m['experts']}local_experts.{first + j}.{linear}", b.t()) for j, b in enumerate(blocks)]


def _stacked_experts(name: str, experts: int) -> Rule | None:
    """The stacked experts' tensor `name` (`...mlp.experts.experts.linear_fc1.weight`, as in megatron_names) and
    its experts' tensors (`...mlp.experts.local_experts.G.linear_fc1.weight`, G global); None for another name."""
    m = STACKED_EXPERTS.fullmatch(name)
    if m is None:
        return None
    return stacked(name, [f"{m[1]}local_experts.{g}.{m[2]}" for g in range(experts)])


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
    """TE norm names <-> local-layer norm names. (An MoE layer's `pre_mlp_layernorm` is TE's name too: to TE, it
    is read as the fused name, which megatron_names.mapping then takes for it; it is written as it is.)"""
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


@dataclass(frozen=True)
class Layout:
    """How the rank files split the model, from the args, checked against the rank directories present."""

    tp: int
    pp: int
    vpp: int
    ep: int
    experts: int
    per_stage: int  # layers per virtual pipeline stage


def layout(directory: Path, args: dict) -> Layout:
    """The args' parallel layout, each size an integer >= 1 and the rank directories it names all there (and no
    others): checked before anything is allocated per rank."""
    where = f"{_first_file(directory)}: args"
    size = functools.partial(require, args, where=where, kind=POSITIVE, default=1)
    tp, pp, vpp = (
        size("tensor_model_parallel_size"),
        size("pipeline_model_parallel_size"),
        size("virtual_pipeline_model_parallel_size"),
    )
    experts = require(args, "num_experts", where, COUNT, default=0)
    ep = size("expert_model_parallel_size") if experts else 1
    for key in UNEVEN:
        if args.get(key):
            refuse(directory, f"an uneven pipeline split (args.{key})", "even pipeline stages")
    layers = require(args, "num_layers", where, POSITIVE)
    if layers % (pp * vpp):
        refuse(directory, f"{layers} layers over {pp * vpp} pipeline stages", "even pipeline stages")
    if experts % ep:
        refuse(directory, f"{experts} experts over {ep} expert-parallel ranks", "experts split evenly over EP ranks")
    expert_tp = size("expert_tensor_parallel_size", default=tp)
    if experts and expert_tp != tp:
        refuse(
            directory,
            f"args.expert_tensor_parallel_size={expert_tp} with args.tensor_model_parallel_size={tp}",
            f"legacy MoE files whose experts are split as the dense layers are (expert TP = TP); {TO_TORCH_DIST}",
        )
    present = {p.name for p in directory.glob("mp_rank_*")}
    ranks = (rank_dir(t, p, pp, e, ep) for e, p, t in itertools.product(range(ep), range(pp), range(tp)))
    missing = next((name for name in ranks if name not in present), None)  # stops within len(present) + 1
    if missing is not None:
        raise UserError(
            f"{directory / missing / FILE}: file not found (args: TP {tp} x PP {pp} x EP {ep} rank files; "
            f"{len(present)} mp_rank_* directories are here)"
        )
    return Layout(tp, pp, vpp, ep, experts, layers // (pp * vpp))


class LegacyStore:
    def __init__(self, directory: Path, args: dict) -> None:
        self.where = directory
        lay = layout(directory, args)
        tp, pp, vpp, ep, experts, per_stage = lay.tp, lay.pp, lay.vpp, lay.ep, lay.experts, lay.per_stage
        self.glu = bool(args.get("swiglu"))
        self.shards: dict[str, list[torch.Tensor | None]] = defaultdict(lambda: [None] * tp)
        self.optimizer_file: Path | None = None  # the first rank file holding optimizer state
        for e, p, t in itertools.product(range(ep), range(pp), range(tp)):
            path = directory / rank_dir(t, p, pp, e, ep) / FILE
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
                    if not isinstance(value, torch.Tensor):
                        continue
                    name = _norm_name(_stage_name(key, offset, True), local=False)
                    found = _experts_of(name, value, experts // ep, e * experts // ep) if experts else None
                    if found is None and e == 0:  # the other EP ranks hold copies of what is not an expert
                        self.shards[name][t] = value
                    for one, tensor in found or ():
                        self.shards[one][t] = tensor
        for name, parts in self.shards.items():
            if any(part is None for part in parts):
                raise UserError(f"{directory}: tensor {name} is missing from TP rank {parts.index(None)}")
        self.stacks: dict[str, Rule] = {}  # a layer's stacked experts' tensor, by the name megatron_names gives it
        for name in self.shards:
            one = ONE_EXPERT.fullmatch(name)
            stack = one and _stacked_experts(f"{one[1]}experts.{one[3]}", experts)
            if stack and stack.ours[0] not in self.stacks:
                missing = [n for n in stack.theirs if n not in self.shards]
                if missing:
                    raise UserError(f"{directory}: tensor {missing[0]} is missing (the layer has {experts} experts)")
                self.stacks[stack.ours[0]] = stack

    def keys(self) -> list[str]:
        return [n for n in self.shards if not ONE_EXPERT.fullmatch(n)] + list(self.stacks)

    def meta(self, name: str) -> torch.Tensor:
        if name in self.stacks:
            return self.stacks[name].to_ours(*map(self.meta, self.stacks[name].theirs))[0]
        return join(name, [torch.empty_like(s, device="meta") for s in self.shards[name]], self.glu)

    def get(self, name: str) -> torch.Tensor:
        if name in self.stacks:
            return self.stacks[name].to_ours(*map(self.get, self.stacks[name].theirs))[0]
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


def _by_expert_rank(name: str, t: torch.Tensor, experts: int, ep: int) -> list[tuple[int | None, str, torch.Tensor]]:
    """(EP rank, name there, tensor): each expert of a stacked experts' tensor, with its local index on its EP rank;
    anything else once, for every EP rank (None)."""
    stack = _stacked_experts(name, experts)
    if stack is None:
        return [(None, name, t)]
    local = experts // ep
    names = [ONE_EXPERT.fullmatch(n) for n in stack.theirs]
    parts = stack.to_theirs(t)
    return [
        (g // local, f"{m[1]}local_experts.{g % local}.{m[3]}", part) for g, (m, part) in enumerate(zip(names, parts))
    ]


def write(
    directory: Path, mapping: Mapping, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype, spec: str
) -> None:
    """Each (TP, PP, EP) rank's file; an MoE layer's experts in SequentialMLP's form (see the module doc)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    experts = getattr(args, "num_experts", None) or 0
    ep = getattr(args, "expert_model_parallel_size", 1) if experts else 1
    models: dict[tuple[int, int, int], dict] = {k: {} for k in itertools.product(range(tp), range(pp), range(ep))}
    weights = ((name, t.to(dtype)) for name, t in mapping.stream_theirs(ckpt.get))
    biases = ((name, torch.zeros(experts)) for name in expert_biases(ckpt.cfg.model))  # fp32, as megatron keeps them
    with Staging(directory) as staging:
        for name, tensor in itertools.chain(weights, biases):
            for e, expert_name, part in _by_expert_rank(name, tensor, experts, ep):
                for stage, local_name in _placements(expert_name, args):
                    stored_name = _norm_name(local_name, local=True) if spec == "local" else local_name
                    for t, shard in enumerate(split(local_name, part, tp, args.swiglu)):
                        shard = staging.put(shard.contiguous())
                        for rank in range(ep) if e is None else (e,):
                            models[t, stage, rank][stored_name] = shard
        for (t, p, e), model in models.items():
            model.update(_extra_states(model, last_stage=p == pp - 1, local=spec == "local"))
            rank = directory / rank_dir(t, p, pp, e, ep)
            rank.mkdir()
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model}
            torch.save(state, rank / FILE)
