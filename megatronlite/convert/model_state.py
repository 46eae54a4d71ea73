"""A model in megatronlite's terms, whatever format it came from: a config and each global tensor on demand.

Every reader opens its files as a `TensorStore` (names, shapes and dtypes up front, data one tensor
at a time), and `from_store` checks the store against the format's `Mapping` before any data is
read: every tensor the config needs is there with the right shape, and nothing is left over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint.views import model_pieces
from megatronlite.checkpoint.weights import expected_shapes
from megatronlite.config import Config, ModelConfig
from megatronlite.convert.mapping import Get, Mapping
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel
from megatronlite.parallel.mesh import Mesh

# copied along with the weights when present (HF tokenizers and generation defaults)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class Options:
    """Choices that only some formats use."""

    dtype: torch.dtype | None = None  # of the output; None: the source's (a native checkpoint is always fp32)
    max_shard_bytes: int = 5 * 10**9  # hf output: one safetensors file up to this size, else shards
    megatron_format: str = "torch_dist"  # megatron output: torch_dist | torch (legacy mp_rank_XX files)
    megatron_tp: int = 1  # megatron output: tensor-parallel size (vocab padding; legacy files)
    megatron_pp: int = 1  # megatron output: pipeline-parallel size (legacy files)
    megatron_ep: int = 1  # megatron output: expert-parallel size (legacy files of MoE models)
    megatron_spec: str = "te"  # megatron output: norm names of Transformer Engine (te) or local layers (legacy
    # files; in torch_dist the names of an MoE layer's pre-MLP norm, which the two spell differently)
    vocab_size: int | None = None  # megatron input: the real vocabulary (else args.vocab_size, else padded)
    weights_only: bool = False  # convert the weights alone, leaving a source's optimizer state and position behind


class TensorStore(Protocol):
    """A format's tensors by the format's own names."""

    where: Path  # named in error messages

    def keys(self) -> list[str]: ...

    def meta(self, name: str) -> torch.Tensor:
        """Shape and dtype only (a `meta` tensor): no data is read."""

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainingState:
    """Adam's state by our global names and the run's position, so `train` continues the source's run
    (where a format holds it). The weights of such a checkpoint are the optimizer's fp32 masters."""

    moments: dict[str, Get]  # "exp_avg" | "exp_avg_sq" -> our global name -> fp32 tensor
    step: int  # the source's training step (Megatron's iteration): the LR schedule's position
    optimizer_steps: int  # Adam's step count (its bias correction): fewer than `step` when steps were skipped
    consumed_samples: int = 0  # the data position: samples of the training set used so far
    optimizer_steps_from: str = "the optimizer state"  # where `optimizer_steps` was read, for the summary line


@dataclass
class Checkpoint:
    cfg: Config
    get: Get  # our global name (see weights.expected_shapes) -> tensor, in `dtype`
    dtype: torch.dtype
    side_files: dict[str, Path] = field(default_factory=dict)  # name to copy as -> file (tokenizer and co)
    training: TrainingState | None = None  # weights only unless the source carries Adam's state
    seed: int | None = None  # the source run's RNG seed where it records one (Megatron's args.seed, our train.seed)
    notes: list[str] = field(default_factory=list)  # what the conversion says beside its summary line


def from_store(
    cfg: Config,
    store: TensorStore,
    mapping: Mapping,
    ignored: Callable[[str], bool],
    files: dict[str, Path] | None = None,
) -> Checkpoint:
    """Check `store` against what `mapping` needs for `cfg` (names and shapes, no data), then wrap it."""
    needed = mapping.their_shapes(expected_shapes(cfg))
    present = set(store.keys())
    what = f"a {cfg.model.arch} model of this config"
    missing = [n for n in needed if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{store.where}: tensor {missing[0]}{more} is missing; {what} needs it")
    for name, shape in needed.items():
        actual = tuple(store.meta(name).shape)
        if actual != shape:
            raise UserError(f"{store.where}: tensor {name} has shape {list(actual)}; {what} needs {list(shape)}")
    extra = sorted(k for k in present - needed.keys() if not ignored(k))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{store.where}: tensor {extra[0]}{more} has no place in {what}")
    dtype = store.meta(next(iter(needed))).dtype
    return Checkpoint(cfg, lambda name: mapping.ours(name, store.get), dtype, files or {})


OUTPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def output_dtype(ckpt: Checkpoint, options: Options) -> torch.dtype:
    dtype = options.dtype or ckpt.dtype
    if dtype not in OUTPUT_DTYPES.values():
        choices = "|".join(OUTPUT_DTYPES)
        raise UserError(f"the source holds {dtype} tensors; choose an output dtype with --dtype {choices}")
    return dtype


def run_config(model: ModelConfig, name: str, tokenizer: str = "byte") -> Config:
    """A run config around an imported model: defaults elsewhere, a sequence length the model allows."""
    raw = {
        "name": name,
        "model": dataclasses.asdict(model),
        "train": {"seq_len": min(config_mod.TrainConfig.seq_len, model.max_seq_len)},
        "data": {"tokenizer": tokenizer},
    }
    return config_mod.from_dict(raw)


def refuse(where: Path | str, setting: str, supported: str) -> None:
    raise UserError(f"{where}: {setting} is not supported; megatronlite converts {supported}")


def tensors_only(entries: dict, where: Path | str, what: str) -> dict[str, torch.Tensor]:
    """`entries` (a state dict read from someone's file) if every value is a tensor, else one line naming the first
    that is not: a converter reads their shapes and bytes."""
    for name, value in entries.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: {what} entry {name!r} is a {type(value).__name__}; expected a tensor")
    return entries


def side_files(directory: Path) -> dict[str, Path]:
    return {f: directory / f for f in SIDE_FILES if (directory / f).is_file()}


@torch.no_grad()
def build_model(ckpt: Checkpoint) -> GPTModel:
    """A single-process megatronlite model holding the checkpoint's weights (fp32), for --verify."""
    model = GPTModel(ckpt.cfg.model)
    for p in model.parameters():
        p.zero_()  # padding rows stay zero
    for piece in model_pieces(dict(model.named_parameters()), Mesh(), for_save=False):
        piece.local.copy_(ckpt.get(piece.key.removeprefix("model.")))
    return model.eval()
