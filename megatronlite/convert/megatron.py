"""Megatron-LM / megatron-core GPT checkpoints: args <-> config, tensor names, directory layout.

    ROOT/latest_checkpointed_iteration.txt        "release" or an iteration number
    ROOT/iter_0000100/ (or release/)              one checkpoint, in one of two formats:
        torch_dist: metadata.json, common.pt (args), DCP files      -> megatron_dist
        torch (legacy): mp_rank_TT[_PPP]/model_optim_rng.pt per rank -> megatron_legacy

The model's shape comes from the Megatron-LM args saved in the checkpoint; the tensor names are
in megatron_names.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert import megatron_dist, megatron_legacy
from megatronlite.convert.megatron_names import ignored, mapping
from megatronlite.convert.model_state import (
    Checkpoint,
    Options,
    from_store,
    output_dtype,
    refuse,
    require,
    run_config,
)
from megatronlite.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"

# Megatron-LM's defaults for the args we read (arguments.py)
DEFAULTS = {
    "normalization": "LayerNorm",
    "swiglu": False,
    "position_embedding_type": "learned_absolute",
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "openai_gelu": False,
    "untie_embeddings_and_output_weights": False,
    "norm_epsilon": 1e-5,
    "rotary_base": 10000,
    "init_method_std": 0.02,
}
FLAVOURS = {
    "llama": {
        "normalization": "RMSNorm",
        "swiglu": True,
        "position_embedding_type": "rope",
        "add_bias_linear": False,
        "add_qkv_bias": False,
    },
    "gpt2": {
        "normalization": "LayerNorm",
        "swiglu": False,
        "position_embedding_type": "learned_absolute",
        "add_bias_linear": True,
        "openai_gelu": True,  # GELU's tanh approximation, as GPT-2 and megatronlite use
    },
}
# features a megatronlite model does not have: the arg and the value that means "off"
ABSENT = {
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "apply_layernorm_1p": False,
    "qk_layernorm": False,
    "num_experts": None,
    "squared_relu": False,
    "multi_latent_attention": False,
    "use_rope_scaling": False,
}
SUPPORTED = (
    "llama-style (RMSNorm, --swiglu, rope, --disable-bias-linear) or gpt2-style "
    "(LayerNorm, --openai-gelu, learned absolute positions, biases) dense GPT models"
)


def iteration_dir(path: Path) -> Path:
    """ROOT (its tracker file, else its newest iter_*), or one iter_*/release directory itself."""
    if not path.is_dir():
        raise UserError(f"{path}: directory not found")
    if re.fullmatch(r"iter_\d{7}|" + RELEASE, path.name):
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        found = path / (RELEASE if text == RELEASE else f"iter_{int(text):07d}" if text.isdigit() else text)
        if not found.is_dir():
            raise UserError(f"{tracker} names {text!r} but {found} does not exist")
        return found
    iterations = sorted(path.glob("iter_[0-9]*"))
    if not iterations:
        raise UserError(f"{path}: not a Megatron checkpoint (no {TRACKER}, iter_NNNNNNN/ or {RELEASE}/)")
    return iterations[-1]


def model_config(args: dict, where: Path, vocab_size: int | None) -> tuple[ModelConfig, int]:
    """The megatronlite model of Megatron-LM args, and the padded vocabulary size the tensors have."""
    values = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    arch = next((a for a, want in FLAVOURS.items() if all(values.get(k) == v for k, v in want.items())), None)
    if arch is None:
        found = ", ".join(f"{k}={values.get(k)!r}" for k in sorted({k for w in FLAVOURS.values() for k in w}))
        refuse(where, f"a model with args {found}", SUPPORTED)
    for key, off in ABSENT.items():
        if args.get(key, off) not in (off, None):
            refuse(where, f"args.{key}={args[key]!r}", SUPPORTED)
    hidden, heads = require(args, "hidden_size", where), require(args, "num_attention_heads", where)
    if args.get("kv_channels") not in (None, hidden // heads):
        refuse(where, f"args.kv_channels={args['kv_channels']} (not hidden_size / num_attention_heads)", SUPPORTED)
    padded = require(args, "padded_vocab_size", where)
    vocab = vocab_size or args.get("vocab_size") or padded
    if vocab > padded:
        raise UserError(f"{where}: vocabulary size {vocab} exceeds the checkpoint's padded vocabulary ({padded})")
    model = ModelConfig(
        arch=arch,
        num_layers=require(args, "num_layers", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=args.get("num_query_groups") if args.get("group_query_attention") else heads,
        ffn_hidden_size=require(args, "ffn_hidden_size", where),
        vocab_size=vocab,
        max_seq_len=args.get("max_position_embeddings") or require(args, "seq_length", where),
        tie_embeddings=not values["untie_embeddings_and_output_weights"],
        norm_eps=float(values["norm_epsilon"]),
        rope_theta=float(values["rotary_base"]),
        init_std=float(values["init_method_std"]),
    )
    return model, padded


def make_args(m: ModelConfig, padded: int, dtype: torch.dtype, options: Options) -> argparse.Namespace:
    """Megatron-LM args describing `m`, enough for `--use-checkpoint-args` and for our reader."""
    flavour = FLAVOURS[m.arch]
    return argparse.Namespace(
        **flavour,
        **{k: v for k, v in ABSENT.items() if v is not None},
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_heads,
        group_query_attention=m.kv_heads != m.num_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        seq_length=m.max_seq_len,
        add_position_embedding=m.arch == "gpt2",
        vocab_size=m.vocab_size,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        untie_embeddings_and_output_weights=not m.tied,
        norm_epsilon=m.norm_eps,
        rotary_base=int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
        init_method_std=m.init_std,
        tensor_model_parallel_size=options.megatron_tp,
        pipeline_model_parallel_size=options.megatron_pp,
        virtual_pipeline_model_parallel_size=None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        ckpt_format=options.megatron_format,
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def read(path: Path, options: Options) -> Checkpoint:
    directory = iteration_dir(path)
    fmt = megatron_dist if megatron_dist.is_dist(directory) else megatron_legacy
    args = fmt.load_args(directory)
    model, padded = model_config(args, directory, options.vocab_size)
    store = fmt.open_store(directory, args)
    return from_store(run_config(model, path.name), store, mapping(model, padded), functools.partial(ignored, model))


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    m = ckpt.cfg.model
    tp, pp = options.megatron_tp, options.megatron_pp
    if m.kv_heads % tp or m.ffn_size % tp or m.num_layers % pp:
        raise UserError(
            f"--megatron-tp {tp} must divide the KV heads ({m.kv_heads}) and FFN size ({m.ffn_size}), "
            f"--megatron-pp {pp} the layers ({m.num_layers})"
        )
    dtype = output_dtype(ckpt, options)
    padded = m.padded_vocab_size(tp)
    args = make_args(m, padded, dtype, options)
    directory = dst / RELEASE
    directory.mkdir(parents=True)
    if options.megatron_format == "torch_dist":
        megatron_dist.write(directory, mapping(m, padded), ckpt, args, dtype)
    else:
        megatron_legacy.write(directory, mapping(m, padded), ckpt, args, dtype, options.megatron_spec)
    (dst / TRACKER).write_text(RELEASE)
