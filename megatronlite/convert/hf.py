"""HuggingFace model directories: `config.json`, safetensors weights, tokenizer files beside them."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import torch

from megatronlite.checkpoint.weights import expected_shapes
from megatronlite.config import ModelConfig
from megatronlite.convert import byte_tokenizer, hf_gpt2, hf_llama, safetensors_io
from megatronlite.convert.fields import OBJECT, TEXTS, check, read_json, require
from megatronlite.convert.hf_features import HFFamily
from megatronlite.convert.mapping import Mapping
from megatronlite.convert.model_state import (
    Checkpoint,
    Options,
    TensorStore,
    from_store,
    output_dtype,
    run_config,
    side_files,
)
from megatronlite.data.tokenizers import ByteTokenizer
from megatronlite.errors import UserError

FAMILIES: tuple[HFFamily, ...] = (*hf_llama.FAMILIES, hf_gpt2)  # export's order of preference
BY_ARCHITECTURE = {f.ARCHITECTURE: f for f in FAMILIES}
HEAD, EMBEDDING = "lm_head.weight", "embedding.word.weight"  # the output layer (theirs), the embedding (ours)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_config(directory: Path) -> tuple[dict, HFFamily]:
    """The raw config.json and the module that converts its architecture."""
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: file not found (an HF model directory holds config.json and {safetensors_io.SINGLE})")
    raw = check(read_json(path, "HF config"), OBJECT, path, "config.json")
    archs = require(raw, "architectures", path, TEXTS, default=[]) or [None]
    family = BY_ARCHITECTURE.get(archs[0])
    if family is None:
        raise UserError(f"{path}: architecture {archs[0]!r} is not supported; supported: {', '.join(BY_ARCHITECTURE)}")
    return raw, family


def family_for(m: ModelConfig) -> HFFamily:
    """The HF architecture a model is written as: its preset's (`model.arch`) if that family expresses every
    feature, else the first that does (a llama with qk_norm is a Qwen3). None doing so is refused, naming
    what stops each family, rather than writing a model transformers would compute differently."""
    preset = [f for f in FAMILIES if f.PRESET == m.arch]
    blockers = {}
    for family in (*preset, *FAMILIES):
        blocker = family.unexpressed(m)
        if blocker is None:
            return family
        blockers[family.ARCHITECTURE] = blocker
    lacks = "; ".join(f"{arch} lacks {blocker}" for arch, blocker in blockers.items())
    raise UserError(f"no HF architecture expresses this {m.arch} model's features: {lacks}")


class _Prefixed:
    """A store whose names gain the base-model prefix they were saved without (as transformers accepts)."""

    def __init__(self, store: TensorStore, prefix: str) -> None:
        self.store, self.prefix, self.where = store, prefix, store.where

    def keys(self) -> list[str]:
        return [self.prefix + k for k in self.store.keys()]

    def meta(self, name: str) -> torch.Tensor:
        return self.store.meta(name.removeprefix(self.prefix))

    def get(self, name: str) -> torch.Tensor:
        return self.store.get(name.removeprefix(self.prefix))


def read(path: Path, options: Options) -> Checkpoint:
    raw, family = read_config(path)
    model = family.model_config(raw, path / "config.json")
    store: TensorStore = safetensors_io.SafetensorsStore(path)
    if not any(k.startswith(family.BASE_PREFIX) for k in store.keys()):
        store = _Prefixed(store, family.BASE_PREFIX)
    notes = []
    if model.tied and HEAD in store.keys() and _own_head(store, family.mapping(model)):
        model = dataclasses.replace(model, tie_embeddings=False)
        notes.append(
            f"{path / 'config.json'} ties the output layer to the embedding, but the files hold another "
            f"{HEAD}: read untied, as transformers reads it (set tie_word_embeddings: false to say so)"
        )
    ignored = functools.partial(family.ignored, model)
    mapping = family.mapping(model, set(store.keys()))  # the layout the files hold (fused experts or not)
    ckpt = from_store(run_config(model, path.name), store, mapping, ignored, side_files(path))
    ckpt.notes += notes
    return ckpt


def _own_head(store: TensorStore, tied: Mapping) -> bool:
    """Whether the files' `lm_head.weight` differs from their embedding (transformers ties the two only when it
    does not: a tied config beside a trained head gives an untied model)."""
    (embedding,) = tied.sources(EMBEDDING)
    head, word = store.meta(HEAD), store.meta(embedding)
    return head.shape != word.shape or not torch.equal(store.get(HEAD), store.get(embedding))


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    model = ckpt.cfg.model
    family = family_for(model)
    dtype = output_dtype(ckpt, options)
    mapping = family.mapping(model)
    dst.mkdir(parents=True)
    shapes = mapping.their_shapes(expected_shapes(ckpt.cfg))
    safetensors_io.write_model(dst, shapes, mapping.stream_theirs(ckpt.get), dtype, options.max_shard_bytes)
    hf = {**family.hf_config(model), "dtype": DTYPE_NAMES[dtype], "torch_dtype": DTYPE_NAMES[dtype]}  # v5, v4
    byte_level = _byte_level(ckpt)
    if byte_level:  # transformers' generate stops at the end-of-document token
        hf["eos_token_id"] = ByteTokenizer.eod_id
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name, f in ckpt.side_files.items():
        shutil.copy2(f, dst / name)
    if byte_level:
        byte_tokenizer.write_hf_files(dst, model.max_seq_len)


def _byte_level(ckpt: Checkpoint) -> bool:
    """Whether the model's tokens are the byte tokenizer's, which has no files to copy: they are written instead.

    A model of fewer than 257 tokens cannot be one (an HF model imported without tokenizer files is recorded
    with `data.tokenizer: byte`).
    """
    byte = ckpt.cfg.data.tokenizer == "byte" and "tokenizer.json" not in ckpt.side_files
    return byte and ckpt.cfg.model.vocab_size >= ByteTokenizer.vocab_size
