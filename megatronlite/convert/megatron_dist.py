"""Megatron's `torch_dist` format: a DCP directory written by megatron-core's dist_checkpointing,
plus `common.pt` (the non-tensor state, with Megatron-LM's args) and `metadata.json` (the backend).

Layer tensors are stored stacked, `decoder.layers.mlp.linear_fc2.weight` of shape [layers, ...],
in whatever chunks the writer's TP/PP layout had; reading one layer reads just its box. We write
one chunk per layer, so memory stays near one layer's tensor, and any TP/PP layout can load it
(megatron-core reshards, and pads or trims the vocabulary rows to its own padded size). A model whose
layers differ (MoE layers among dense ones: --moe-layer-freq a list or above 1) is stored per layer instead,
`decoder.layers.3.mlp.linear_fc2.weight`, as megatron-core's TransformerBlock then saves it. The experts of an MoE
layer are one tensor with an expert dim after the layer dim (global expert indices: any EP layout loads it).

A training checkpoint also holds the optimizer's state, in one of two kinds of layout:

- model space: each state tensor shaped like its model tensor (stacked layers included), under
  `optimizer.state.exp_avg.KEY`, `optimizer.state.exp_avg_sq.KEY` and the fp32 masters
  `optimizer.state.param.KEY` (the distributed optimizer's `fully_reshardable` layout, which Megatron-LM writes
  with --dist-ckpt-optim-fully-reshardable) or `optimizer.state.fp32_param.KEY` (the fp16/bf16 non-distributed
  optimizer); Adam's step count in common.pt: `optimizer.optimizer.param_groups[*].step` (distributed) or
  `optimizer[.optimizer].state.common_step` (non-distributed). Moments are elementwise with their weights, so
  the weights' mapping renames, splits and unpads them too. This is what we read and write.
- bucket space (`dp_reshardable`, Megatron-LM's default, and `dp_zero_gather_scatter`): flat per-bucket
  buffers under `optimizer.distributed.dp_group_idx_*`, laid out by megatron-core's gradient buffers (bucket
  sizes, padding, parameter order inside a bucket). Refused, naming how to re-save it, or --weights-only.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatronlite.checkpoint.weights import LazyChunk, expected_shapes, save_chunks
from megatronlite.convert.dcp_store import Box, DcpStore, stored_tensors, whole
from megatronlite.convert.mapping import Get, Mapping
from megatronlite.convert.megatron_names import EXPERTS, LAYER, expert_biases
from megatronlite.convert.model_state import Checkpoint, TrainingState
from megatronlite.convert.parking import Staging
from megatronlite.errors import UserError
from megatronlite.untrusted import load_torch_bytes, load_torch_file, read_dcp_bytes

METADATA = "metadata.json"
COMMON = "common.pt"
# where newer megatron-core (0.19 here) keeps what common.pt held: one object entry of the DCP files
COMMON_STATE = "common_state/shard_0_1"
BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
STACKED = "decoder.layers."
OPTIMIZER = "optimizer."  # a training checkpoint's optimizer state
STATE = "optimizer.state."  # ... in model space: STATE + KIND + "." + model key
MOMENTS = ("exp_avg", "exp_avg_sq")
MASTERS = ("param", "fp32_param")  # the fp32 weights: the distributed optimizer's, the non-distributed one's
MODEL_SPACE = "fully_reshardable"
BUCKET_SPACE = "optimizer.distributed."
BUCKETS = "flat buffers of the distributed optimizer's gradient buckets, tied to megatron-core's internal layout"
LAYOUTS = {  # the distributed optimizer's layouts megatronlite refuses, and why
    "dp_reshardable": BUCKETS,
    "dp_zero_gather_scatter": BUCKETS,
    "fully_sharded_model_space": "flattened slices of each tensor, as megatron-core wrote them before 0.14",
    "fsdp_dtensor": "Megatron-FSDP's DTensors",
}
# what megatron-core's sharded_state_dict is told on load (Megatron-LM reads it from common.pt)
CONTENT_METADATA = {
    "distrib_optim_sharding_type": MODEL_SPACE,
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
RESAVE = (
    "save it again from Megatron-LM with --dist-ckpt-optim-fully-reshardable (model-space optimizer state; e.g. "
    "--load it with --ckpt-convert-format torch_dist --ckpt-convert-save DIR), or pass --weights-only to convert "
    "the weights alone"
)
LINEARS = tuple(f"{m}.weight" for m in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))


def is_dist(directory: Path) -> bool:
    return (directory / METADATA).is_file()


def load_common(directory: Path) -> dict:
    """The non-tensor state (args, iteration, the optimizer's param groups, the LR scheduler's state): common.pt,
    or megatron-core's `common_state` entry (a one-item list) where it writes no common.pt."""
    try:
        backend = json.loads((directory / METADATA).read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{directory / METADATA}: not valid JSON ({e})") from None
    if backend != "torch_dist":
        raise UserError(f"{directory}: sharded backend {backend!r}; megatronlite reads torch_dist and legacy torch")
    if (directory / COMMON).is_file():
        where, common = directory / COMMON, load_torch_file(directory / COMMON)
    else:
        where, data = f"{directory} ({COMMON_STATE})", read_dcp_bytes(directory, COMMON_STATE)
        if data is None:
            raise UserError(f"{directory}: neither {COMMON} nor a {COMMON_STATE} entry (megatron-core's common state)")
        common = load_torch_bytes(data, where)
        common = common[0] if isinstance(common, list) and len(common) == 1 else common
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{where}: no Megatron-LM args; they hold the model's shape, needed to convert it")
    return common


def load_args(directory: Path) -> dict:
    return vars(load_common(directory)["args"])


def open_store(directory: Path, args: dict, prefix: str = "") -> DcpStore:
    """The model's tensors (`prefix` ""), or one optimizer state's in model space (`prefix` STATE + kind + "."),
    by megatron-core's model keys with one name per layer."""
    layers = args["num_layers"]
    boxes = {}
    for key, (shape, dtype) in stored_tensors(directory).items():
        if (prefix and not key.startswith(prefix)) or (not prefix and key.startswith(OPTIMIZER)):
            continue
        key_in_model = key.removeprefix(prefix)
        rest = key_in_model.removeprefix(STACKED)
        if key_in_model == rest or rest.split(".")[0].isdigit():  # not stacked (or saved per layer)
            boxes[key_in_model] = whole(key, shape, dtype)
            continue
        if not shape or shape[0] != layers:
            raise UserError(
                f"{directory}: stacked tensor {key} has size {list(shape)}; its first dim must be args.num_layers, "
                f"{layers}"
            )
        for i in range(layers):
            boxes[f"{STACKED}{i}.{rest}"] = Box(key, (i,) + (0,) * (len(shape) - 1), (1, *shape[1:]), dtype, True)
    return DcpStore(directory, boxes)


@dataclass(frozen=True)
class OptimizerState:
    """A training checkpoint's Adam state in model space, by megatron-core's names, and the run's position."""

    moments: dict[str, DcpStore]  # "exp_avg" | "exp_avg_sq" -> its tensors
    masters: DcpStore | None  # the fp32 weights, where the optimizer keeps its own
    iteration: int
    consumed_samples: int  # args.consumed_train_samples
    adam_steps: int
    adam_steps_from: str


def _is_count(value: object) -> bool:
    """A step count as megatron-core stores it: a number, or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _adam_steps(optimizer: object, iteration: int, where: Path) -> tuple[int, str]:
    """Adam's step count from the common state: the param groups' `step` (distributed optimizer, or apex/TE's
    FusedAdam) or `state.common_step` (megatron-core's non-distributed optimizers); else the iteration."""
    found: dict[float, str] = {}
    for inner in (optimizer, optimizer.get("optimizer") if isinstance(optimizer, dict) else None):
        if not isinstance(inner, dict):
            continue
        groups = inner.get("param_groups")
        for group in groups if isinstance(groups, list) else []:
            if isinstance(group, dict) and _is_count(group.get("step")):
                found[float(group["step"])] = "the optimizer's param_groups step"
        state = inner.get("state")
        if isinstance(state, dict) and _is_count(state.get("common_step")):
            found[float(state["common_step"])] = "the optimizer's common_step"
    if len(found) > 1:
        raise UserError(
            f"{where}: the common state's optimizer param groups hold different step counts {sorted(found)}"
        )
    if found:
        step, source = next(iter(found.items()))
        return int(step), source
    return iteration, "the iteration (the checkpoint records no optimizer step)"


def optimizer_state(directory: Path, args: dict, store: DcpStore) -> OptimizerState | None:
    """The checkpoint's optimizer state in model space; None when it holds none (a release, --no-save-optim).
    Bucket-space state (see the module doc) and anything but Adam's are refused with one line."""
    common = load_common(directory)
    tensors = stored_tensors(directory)
    optimizer = common.get("optimizer")
    if optimizer is None and not any(k.startswith(OPTIMIZER) for k in tensors):
        return None
    layout = optimizer.get("param_state_sharding_type") if isinstance(optimizer, dict) else None
    if layout not in (None, MODEL_SPACE) or any(k.startswith(BUCKET_SPACE) for k in tensors):
        layout = layout or "dp_reshardable"
        how = LAYOUTS.get(layout, "a layout megatronlite does not know")
        raise UserError(
            f"{directory}: its optimizer state is in megatron-core's {layout!r} layout ({how}), which megatronlite "
            f"does not read; {RESAVE}"
        )
    kinds = sorted({k.removeprefix(STATE).split(".")[0] for k in tensors if k.startswith(STATE)})
    unknown = [k for k in kinds if k not in MOMENTS + MASTERS]
    if unknown or not set(MOMENTS) <= set(kinds):
        raise UserError(
            f"{directory}: its optimizer state holds {', '.join(kinds) or 'no tensors'}; megatronlite carries "
            "Adam's exp_avg and exp_avg_sq (with fp32 param or fp32_param masters): pass --weights-only to "
            "convert the weights alone"
        )
    stores = {kind: open_store(directory, args, f"{STATE}{kind}.") for kind in kinds}
    iteration = common.get("iteration")
    if not isinstance(iteration, int) or iteration < 0:
        raise UserError(f"{directory}: the common state's iteration is missing or malformed ({iteration!r})")
    consumed = args.get("consumed_train_samples") or 0
    steps, source = _adam_steps(optimizer, iteration, directory)
    masters = next((stores[k] for k in MASTERS if k in stores), None)
    return OptimizerState({k: stores[k] for k in MOMENTS}, masters, iteration, int(consumed), steps, source)


def _extra_states(chunks: list[LazyChunk], layers: int) -> dict[str, list[None]]:
    """Per-layer `_extra_state` objects (FP8 metadata; None without it), which megatron-core's loader
    requires for every linear layer, and for Transformer Engine's attention (ignored by local layers).
    megatron-core stores each object as a one-element list under `KEY/shard_OFFSETS_SHAPE`: one per layer of a
    stacked key (`shard_2_4`: layer 2 of 4), per expert too for experts (`shard_2.1_4.8`: expert 1 of 8), and
    under a per-layer key one object (`shard_0_1`) or one per expert (`shard_1_8`)."""
    out: dict[str, list[None]] = {}
    for c in chunks:
        if not (c.key.startswith(STACKED) and c.key.endswith(LINEARS)):
            continue
        module = c.key.removesuffix(".weight")
        stacked = not module.removeprefix(STACKED).split(".")[0].isdigit()
        offsets, shape = ((c.offsets[0],), (layers,)) if stacked else ((), ())
        if EXPERTS in module:
            count = c.global_shape[len(shape)]
            grid = [(offsets + (e,), shape + (count,)) for e in range(count)]
        else:
            grid = [(offsets or (0,), shape or (1,))]
        modules = [module] + (
            [module.replace(".linear_qkv", ".core_attention")] if module.endswith(".linear_qkv") else []
        )
        for name in modules:
            for at, size in grid:
                out[f"{name}._extra_state/shard_{'.'.join(map(str, at))}_{'.'.join(map(str, size))}"] = [None]
    return dict(sorted(out.items()))


def per_layer(args: argparse.Namespace) -> bool:
    """Whether megatron-core saves the layers one key each (TransformerBlock.sharded_state_dict): when MoE layers
    sit among dense ones, --moe-layer-freq a list or an interval above 1."""
    freq = getattr(args, "moe_layer_freq", 1) if getattr(args, "num_experts", None) else 1
    return isinstance(freq, list) or freq > 1


def scheduler_state(args: argparse.Namespace) -> dict:
    """Megatron-LM's OptimizerParamScheduler.state_dict() for `args` at `args.consumed_train_samples`, as
    Megatron-LM's get_optimizer_param_scheduler makes it from iteration-based args (its steps count samples)."""
    samples = args.global_batch_size
    return {
        "max_lr": args.lr,
        "lr_warmup_steps": args.lr_warmup_iters * samples,
        "num_steps": args.consumed_train_samples,
        "lr_decay_style": args.lr_decay_style,
        "lr_decay_steps": args.lr_decay_iters * samples,
        "min_lr": args.min_lr,
        "start_wd": args.start_weight_decay,
        "end_wd": args.end_weight_decay,
        "wd_incr_style": args.weight_decay_incr_style,
        "wd_incr_steps": args.train_iters * samples,
    }


def param_groups(args: argparse.Namespace, adam_steps: int) -> list[dict]:
    """megatron-core's two default param groups (weight decay; none on biases and 1-D tensors), told apart on load
    by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr), with the hyperparameters of torch's AdamW and
    apex/TE's FusedAdam (`bias_correction`). The LR scheduler sets each group's lr and weight decay on load."""
    base = {
        "is_expert_parallel": False,
        "default_config": True,
        "lr_mult": 1.0,
        "is_decoupled_lr": False,
        "max_lr": args.lr,
        "min_lr": args.min_lr,
        "lr": args.lr,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_eps,
        "bias_correction": True,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": True,
        "step": float(adam_steps),
    }
    return [{**base, "wd_mult": m, "weight_decay": args.weight_decay * m} for m in (1.0, 0.0)]


def _common(args: argparse.Namespace, training: TrainingState | None) -> dict:
    common = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration}
    if training is not None:
        groups = param_groups(args, training.optimizer_steps)
        common["optimizer"] = {"optimizer": {"param_groups": groups}, "param_state_sharding_type": MODEL_SPACE}
        common["opt_param_scheduler"] = scheduler_state(args)
        common["content_metadata"] = dict(CONTENT_METADATA)
    return common


def write(directory: Path, mapping: Mapping, ckpt: Checkpoint, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """The model in `dtype`; with `ckpt.training`, Adam's state in model space too (fp32; `param`: the fp32
    weights), the layout megatron-core's distributed optimizer loads as `fully_reshardable`."""
    tensors: list[tuple[str, Get, torch.dtype]] = [("", ckpt.get, dtype)]
    if ckpt.training is not None:
        tensors.append((f"{STATE}param.", ckpt.get, torch.float32))
        tensors += [(f"{STATE}{kind}.", ckpt.training.moments[kind], torch.float32) for kind in MOMENTS]
    their_shapes = mapping.their_shapes(expected_shapes(ckpt.cfg))
    stack = not per_layer(args)
    with Staging(directory) as staging:  # DCP's writer holds every tensor of a file until the file is done

        def load(get: Get, name: str, stacked: bool, dtype: torch.dtype) -> torch.Tensor:
            t = staging.put(mapping.theirs(name, get).to(dtype))
            return t.unsqueeze(0) if stacked else t

        chunks = []
        experts = (ckpt.cfg.model.moe.num_experts,)
        for name in expert_biases(ckpt.cfg.model):  # zeros (see megatron_names), in the model alone, fp32 as kept
            layer = LAYER.fullmatch(name)
            if stack:
                at, stacked = (int(layer[1]), 0), (args.num_layers, *experts)
                chunks.append(
                    LazyChunk(
                        STACKED + layer[2], stacked, at, (1, *experts), torch.float32, lambda: torch.zeros(1, *experts)
                    )
                )
            else:
                chunks.append(LazyChunk(name, experts, (0,), experts, torch.float32, lambda: torch.zeros(experts)))
        for prefix, get, kind_dtype in tensors:
            for name, shape in their_shapes.items():
                layer = LAYER.fullmatch(name) if stack else None
                if layer is None:
                    whole_tensor = functools.partial(load, get, name, False, kind_dtype)
                    chunks.append(LazyChunk(prefix + name, shape, (0,) * len(shape), shape, kind_dtype, whole_tensor))
                    continue
                offsets = (int(layer[1]),) + (0,) * len(shape)
                key, stacked = prefix + STACKED + layer[2], (args.num_layers, *shape)
                one_layer = functools.partial(load, get, name, True, kind_dtype)
                chunks.append(LazyChunk(key, stacked, offsets, (1, *shape), kind_dtype, one_layer))
        save_chunks(directory, chunks, _extra_states(chunks, args.num_layers))
    torch.save(_common(args, ckpt.training), directory / COMMON)
    (directory / METADATA).write_text(json.dumps(BACKEND))
