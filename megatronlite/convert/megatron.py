"""Megatron-LM / megatron-core GPT checkpoints: args <-> config, tensor names, directory layout.

    ROOT/latest_checkpointed_iteration.txt        "release" or an iteration number
    ROOT/iter_0000100/ (or release/)              one checkpoint, in one of two formats:
        torch_dist: metadata.json, common.pt (args), DCP files      -> megatron_dist
        torch (legacy): mp_rank_TT[_PPP]/model_optim_rng.pt per rank -> megatron_legacy

The model's shape and every feature come from the Megatron-LM args saved in the checkpoint (`features`;
`arch` only names the closest family), and are written back as args on export; a feature one side
cannot express is refused, never approximated. The tensor names are in megatron_names.

Mixture of experts: --num-experts and the --moe-* args are read by `config from-megatron`'s mapping
(from_megatron.mapping.Mapper.moe: experts, top-k, widths, layer pattern, router score and normalisation,
scaling, balance and z losses, expert bias, shared expert and its gate), and written back (`moe_args`). What
changes the layer's function and megatronlite lacks (`MOE_ABSENT`: group-limited routing, token dropping,
input jitter, ...; biases on the router and experts) is refused; how the balance loss is pooled only trains
differently and is taken as config from-megatron takes it. An MoE run's optimizer state is not carried (see
`refuse_moe_run`).

A training checkpoint carries the run: the iteration (our step, and so the LR schedule's position),
args.consumed_train_samples (the data position), Adam's moments and step count, the fp32 master weights,
and args.seed (`Checkpoint.seed`). torch_dist holds them in model space (see megatron_dist); what the
legacy format holds is refused (see megatron_legacy) unless --weights-only. Exported from a training
checkpoint, the output is `iter_NNNNNNN/` named by the tracker, in torch_dist with the distributed
optimizer's `fully_reshardable` layout: Megatron-LM resumes it with --use-distributed-optimizer and
--no-load-rng (no RNG state is written: it restarts from --seed).
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.config import Config, ModelConfig, MoEConfig, read_text
from megatronlite.convert import megatron_dist, megatron_legacy
from megatronlite.convert.fields import NUMBER, POSITIVE, require
from megatronlite.convert.megatron_names import expert_biases, ignored, mapping
from megatronlite.convert.model_state import (
    Checkpoint,
    Options,
    TrainingState,
    from_store,
    output_dtype,
    refuse,
    run_config,
)
from megatronlite.convert.presets import closest_arch
from megatronlite.errors import UserError
from megatronlite.models.rope import scaling_parameters
from megatronlite.untrusted import plain_name

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"

# Megatron-LM's defaults for the args we read (arguments.py)
DEFAULTS = {
    "normalization": "LayerNorm",
    "swiglu": False,
    "openai_gelu": False,
    "position_embedding_type": "learned_absolute",
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "use_rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "window_size": None,
    "untie_embeddings_and_output_weights": False,
    "norm_epsilon": 1e-5,
    "rotary_base": 10000,
    "init_method_std": 0.02,
}
NORMS = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}  # Megatron's name -> ours
POSITIONS = {"rope": "rope", "learned_absolute": "learned"}
# megatron-core's llama3 RoPE scaling takes only the factor from args; RotaryEmbedding._apply_scaling fixes the rest
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# features a megatronlite model does not have: the arg and the value that means "off"
ABSENT = {
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "rotary_seq_len_interpolation_factor": None,
    "apply_layernorm_1p": False,
    "squared_relu": False,
    "multi_latent_attention": False,
    "window_attn_skip_freq": None,
    "softmax_type": "vanilla",
    # none of these leaves a trace in the tensors: each changes what the same weights compute
    "no_rope_freq": None,  # layers without RoPE
    "qk_l2_norm": False,  # a weightless L2 norm of queries and keys
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "apply_residual_connection_post_layernorm": False,
    "heterogeneous_layers_config_path": None,
    "heterogeneous_layers_config_encoded_json": None,
}
# megatron-core MoE features megatronlite does not have: the arg and the value that means "off"
MOE_ABSENT = {
    "moe_router_num_groups": None,  # group-limited routing (DeepSeek's device- or node-limited top-k)
    "moe_router_group_topk": None,
    "moe_router_topk_limited_devices": None,
    # token dropping: megatron-core keeps the most probable assignments over capacity (or a top-k over a 0/1 map,
    # --moe-token-drop-policy position), megatronlite the earliest tokens
    "moe_expert_capacity_factor": None,
    "moe_input_jitter_eps": None,  # multiplicative noise on the router's input, in every forward
    "moe_router_force_load_balancing": False,  # random router logits (a benchmark mode)
    "moe_apply_probs_on_input": False,  # the router's weight applied to the expert's input, not its output
    "moe_latent_size": None,  # experts in a projected latent space
}
# config from-megatron's approximations that only train differently: how the balance loss pools its assignments,
# and expert TP (the legacy reader takes expert TP = TP; torch_dist holds whole experts)
MOE_TRAINING = {"moe_router_load_balancing_type", "expert_tensor_parallel_size"}
DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}  # ours -> Megatron's
SUPPORTED = (
    "dense GPT models: RMSNorm or LayerNorm, --swiglu or --openai-gelu, rope (optionally --use-rope-scaling) "
    "or learned absolute positions, biases on all linear layers or QKV only, --qk-layernorm with RMSNorm, "
    "a causal --window-size on every layer"
)
SUPPORTED_MOE = (
    "megatron-core MoE layers without biases: softmax or sigmoid top-k routing (pre-softmax or renormalised, scaled, "
    "an expert bias of zeros), dropless, SwiGLU or GELU experts, a shared expert with or without its sigmoid gate"
)


def iteration_dir(path: Path) -> Path:
    """ROOT (its tracker file, else its newest iter_*), or one iter_*/release directory itself."""
    if not path.is_dir():
        raise UserError(f"{path}: directory not found")
    if re.fullmatch(r"iter_\d{7}|" + RELEASE, path.name):
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = read_text(tracker, "tracker file").strip()
        name = f"iter_{int(text):07d}" if text.isdigit() else plain_name(text, tracker, "checkpoint directory")
        found = path / name
        if not found.is_dir():
            raise UserError(f"{tracker} names {text!r} but {found} does not exist")
        return found
    iterations = sorted(path.glob("iter_[0-9]*"))
    if not iterations:
        raise UserError(f"{path}: not a Megatron checkpoint (no {TRACKER}, iter_NNNNNNN/ or {RELEASE}/)")
    return iterations[-1]


def _lookup(values: dict, key: str, table: dict[str, str], where: Path) -> str:
    if values[key] not in table:
        refuse(where, f"args.{key}={values[key]!r}", SUPPORTED)
    return table[values[key]]


def _window(window_size: object, where: Path) -> int | None:
    """Megatron's (left, right) window, left = -1 meaning unbounded, as our window: the tokens a query sees."""
    if window_size is None:
        return None
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and window_size[1] == 0):
        refuse(where, f"args.window_size={window_size!r} (not a causal (left, 0) window)", SUPPORTED)
    left = window_size[0]
    if not (isinstance(left, int) and not isinstance(left, bool) and left >= -1):
        raise UserError(f"{where}: args.window_size={window_size!r}; its left size must be an integer >= -1")
    return None if left == -1 else left + 1


def features(values: dict, where: Path) -> dict:
    """megatronlite's model features of Megatron-LM args (with Megatron's defaults filled in)."""
    for key, off in ABSENT.items():
        if values.get(key, off) not in (off, None):
            refuse(where, f"args.{key}={values[key]!r}", SUPPORTED)
    norm = _lookup(values, "normalization", NORMS, where)
    if not (values["swiglu"] or values["openai_gelu"]):
        refuse(where, "args.swiglu=False with args.openai_gelu=False (erf GELU)", SUPPORTED)
    if values["qk_layernorm"] and norm != "rmsnorm":
        refuse(where, f"args.qk_layernorm with args.normalization={values['normalization']!r}", SUPPORTED)
    position = _lookup(values, "position_embedding_type", POSITIONS, where)
    llama3 = {"type": "llama3", "factor": float(require(values, "rope_scaling_factor", where, NUMBER)), **LLAMA3_FIXED}
    return dict(
        norm=norm,
        norm_eps=float(require(values, "norm_epsilon", where, NUMBER)),
        activation="swiglu" if values["swiglu"] else "gelu",
        position=position,
        rope_theta=float(require(values, "rotary_base", where, NUMBER)),
        rope_scaling=llama3 if position == "rope" and values["use_rope_scaling"] else None,
        bias=bool(values["add_bias_linear"]),
        qkv_bias=bool(values["add_bias_linear"] or values["add_qkv_bias"]),  # Megatron's linear_qkv: either arg
        qk_norm=bool(values["qk_layernorm"]),
        sliding_window=_window(values["window_size"], where),
        tie_embeddings=not values["untie_embeddings_and_output_weights"],
    )


def moe_config(args: dict, where: Path) -> MoEConfig:
    """`model.moe` of Megatron-LM's MoE args, as `config from-megatron` maps them; what megatronlite's MoE layer
    cannot compute is refused."""
    if not args.get("num_experts"):
        return MoEConfig()
    from megatronlite.from_megatron.mapping import Args, Mapper

    for key, off in MOE_ABSENT.items():
        if args.get(key, off) not in (off, None):
            refuse(where, f"args.{key}={args[key]!r}", SUPPORTED_MOE)
    if args.get("add_bias_linear", DEFAULTS["add_bias_linear"]):
        refuse(where, "args.add_bias_linear with args.num_experts (biases on the router and experts)", SUPPORTED_MOE)
    balance = args.get("moe_router_load_balancing_type")
    if "sinkhorn" in (balance if isinstance(balance, list) else [balance]):
        refuse(where, f"args.moe_router_load_balancing_type={balance!r} (Sinkhorn routing)", SUPPORTED_MOE)
    mapper = Mapper(Args(args), {}, str(where), None)
    found = mapper.moe(require(args, "num_layers", where, POSITIVE))
    for dest in sorted(mapper.flagged - MOE_TRAINING):
        refuse(where, f"args.{dest}={args.get(dest)!r}", SUPPORTED_MOE)
    return MoEConfig(**found)


def model_config(args: dict, where: Path, vocab_size: int | None) -> tuple[ModelConfig, int]:
    """The megatronlite model of Megatron-LM args, and the padded vocabulary size the tensors have."""
    values = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    found = features(values, where)
    size = functools.partial(require, args, where=where, kind=POSITIVE)
    hidden, heads, padded = size("hidden_size"), size("num_attention_heads"), size("padded_vocab_size")
    kv_channels = size("kv_channels", default=None)
    vocab = vocab_size or size("vocab_size", default=padded)
    if vocab > padded:
        raise UserError(f"{where}: vocabulary size {vocab} exceeds the checkpoint's padded vocabulary ({padded})")
    model = ModelConfig(
        arch=closest_arch(found),
        num_layers=size("num_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=size("num_query_groups") if args.get("group_query_attention") else heads,
        head_dim=None if kv_channels in (None, hidden // heads) else kv_channels,
        ffn_hidden_size=size("ffn_hidden_size"),
        vocab_size=vocab,
        max_seq_len=size("max_position_embeddings", default=None) or size("seq_length"),
        init_std=float(require(values, "init_method_std", where, NUMBER)),
        moe=moe_config(args, where),
        **found,
    )
    return model, padded


def _rope_scaling_args(m: ModelConfig) -> dict:
    """`use_rope_scaling` and its factor: megatron-core's only RoPE scaling for GPT models is llama3 with fixed
    frequency bands. (Its yarn is not the same model: GPTModel drops yarn's attention factor.)"""
    if m.rope_scaling is None:
        return {"use_rope_scaling": False}
    p = scaling_parameters(m)
    if p["type"] != "llama3":
        raise UserError(f"model.rope_scaling.type={p['type']!r} cannot be written for Megatron (llama3 only)")
    for key, fixed in LLAMA3_FIXED.items():
        if p[key] != fixed:
            raise UserError(
                f"model.rope_scaling.{key}={p[key]!r} cannot be written for Megatron; megatron-core fixes it to {fixed}"
            )
    return {"use_rope_scaling": True, "rope_scaling_factor": p["factor"]}


def feature_args(m: ModelConfig) -> dict:
    """The Megatron-LM args of `m`'s features; a feature Megatron cannot express is refused."""
    if m.bias and not m.qkv_bias:
        raise UserError("model.bias without model.qkv_bias cannot be written for Megatron: add_bias_linear covers QKV")
    if m.qk_norm and m.norm != "rmsnorm":
        raise UserError(f"model.qk_norm with model.norm={m.norm!r} cannot be written for Megatron (q/k LayerNorm)")
    return dict(
        normalization={ours: theirs for theirs, ours in NORMS.items()}[m.norm],
        norm_epsilon=m.norm_eps,
        swiglu=m.gated,
        openai_gelu=m.activation == "gelu",  # GELU's tanh approximation, as GPT-2 and megatronlite use
        position_embedding_type={ours: theirs for theirs, ours in POSITIONS.items()}[m.position],
        add_position_embedding=m.position == "learned",
        rotary_base=int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
        **_rope_scaling_args(m),
        add_bias_linear=m.bias,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,
        window_size=None if m.sliding_window is None else (m.sliding_window - 1, 0),
        untie_embeddings_and_output_weights=not m.tied,
    )


def moe_args(m: ModelConfig) -> dict:
    """The Megatron-LM args of `m.moe`; a setting megatron-core's MoE layer cannot express is refused."""
    moe = m.moe
    if not moe.num_experts:
        return {"num_experts": None}

    def cannot(key: str, why: str) -> UserError:
        return UserError(f"model.moe.{key}={getattr(moe, key)!r} cannot be written for Megatron: {why}")

    if m.bias:
        raise UserError(
            "model.bias with model.moe cannot be written for Megatron: add_bias_linear also puts biases on the "
            "router and the experts, which megatronlite's experts do not have"
        )
    if moe.capacity_factor is not None:
        raise cannot(
            "capacity_factor", "megatron-core keeps the most probable assignments over capacity, not the earliest"
        )
    if moe.router == "sigmoid" and moe.normalize_top_k != (moe.top_k > 1):
        raise cannot("normalize_top_k", "megatron-core's sigmoid router renormalises the chosen weights when top_k > 1")
    if moe.router == "softmax" and moe.top_k == 1 and moe.normalize_top_k:
        raise cannot("normalize_top_k", "at top_k 1 megatron-core's softmax router is pre-softmax (not renormalised)")
    if moe.router == "softmax" and moe.bias_update_rate:
        raise cannot("bias_update_rate", "megatron-core's expert bias needs the sigmoid router")
    return dict(
        num_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=m.expert_ffn_size,
        moe_layer_freq=1 if all(moe.layers(m.num_layers)) else moe.layer_freq,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_score_function=moe.router,
        moe_router_pre_softmax=moe.router == "softmax" and not moe.normalize_top_k,
        moe_router_topk_scaling_factor=None if moe.scaling_factor == 1.0 else moe.scaling_factor,
        moe_router_load_balancing_type="global_aux_loss" if moe.aux_loss_scope == "global" else "aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=bool(moe.bias_update_rate),
        moe_router_bias_update_rate=moe.bias_update_rate or 1e-3,  # Megatron-LM's default when it is off
        moe_grouped_gemm=False,  # SequentialMLP, the experts' form we write (megatron_legacy)
        **MOE_ABSENT,
    )


def make_args(m: ModelConfig, padded: int, dtype: torch.dtype, options: Options) -> argparse.Namespace:
    """Megatron-LM args describing `m`, enough for `--use-checkpoint-args` and for our reader."""
    return argparse.Namespace(
        **feature_args(m),
        **{k: v for k, v in ABSENT.items() if v is not None},
        **moe_args(m),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_heads,
        group_query_attention=m.kv_heads != m.num_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_size,
        max_position_embeddings=m.max_seq_len,
        seq_length=m.max_seq_len,
        vocab_size=m.vocab_size,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        init_method_std=m.init_std,
        tensor_model_parallel_size=options.megatron_tp,
        pipeline_model_parallel_size=options.megatron_pp,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=options.megatron_ep,
        expert_tensor_parallel_size=options.megatron_tp if m.moe.num_experts else None,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        ckpt_format=options.megatron_format,
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def training_args(ckpt: Checkpoint, training: TrainingState) -> dict:
    """The Megatron-LM args of the run's position and of our train/optim config (iteration-based)."""
    t, o = ckpt.cfg.train, ckpt.cfg.optim
    return dict(
        iteration=training.step,
        consumed_train_samples=training.consumed_samples,
        train_iters=t.steps,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed if ckpt.seed is None else ckpt.seed,
        optimizer="adam",
        use_distributed_optimizer=True,
        dist_ckpt_optim_fully_reshardable=True,
        lr=o.lr,
        min_lr=o.min_lr,
        lr_decay_style=DECAY_STYLES[o.schedule],
        lr_decay_iters=t.steps,
        lr_warmup_iters=o.warmup_steps,
        lr_warmup_fraction=None,
        lr_warmup_init=0.0,
        lr_wsd_decay_style="linear",
        lr_wsd_decay_iters=max(1, round(o.decay_fraction * t.steps)),
        weight_decay=o.weight_decay,
        start_weight_decay=o.weight_decay,
        end_weight_decay=o.weight_decay,
        weight_decay_incr_style="constant",
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
    )


def read(path: Path, options: Options) -> Checkpoint:
    """The weights; with a training checkpoint (unless --weights-only) the run too, its weights the fp32 masters."""
    directory = iteration_dir(path)
    fmt = megatron_dist if megatron_dist.is_dist(directory) else megatron_legacy
    args = fmt.load_args(directory)
    model, padded = model_config(args, directory, options.vocab_size)
    store = fmt.open_store(directory, args)
    stored = set(store.keys())
    rules = mapping(model, padded, stored=stored)
    cfg, skip = run_config(model, path.name), functools.partial(ignored, model)
    ckpt = from_store(cfg, store, rules, skip)  # its dtype stays the model tensors' (the run's training dtype)
    ckpt.seed = args.get("seed")
    for name in expert_biases(model):
        if name in stored and store.get(name).any():
            raise UserError(
                f"{directory}: {name} holds nonzero selection biases (aux-loss-free balancing), which megatronlite "
                "keeps as training state, not weights: the converted model would route differently; megatronlite "
                "converts MoE checkpoints whose expert biases are zero"
            )
    state = None if options.weights_only else fmt.optimizer_state(directory, args, store)
    if state is None:
        return ckpt
    refuse_moe_run(model)
    ckpt.cfg = _carried_run_config(ckpt, args, path, directory)
    if state.masters is not None:
        ckpt.get = from_store(cfg, state.masters, rules, skip).get
    moments = {kind: from_store(cfg, moment, rules, skip).get for kind, moment in state.moments.items()}
    steps, consumed = state.adam_steps, state.consumed_samples
    ckpt.training = TrainingState(moments, state.iteration, steps, consumed, state.adam_steps_from)
    return ckpt


def refuse_moe_run(m: ModelConfig) -> None:
    """An MoE run's optimizer state is not carried either way: megatron-core keeps the experts' parameters in an
    optimizer of their own (param groups with is_expert_parallel, chained with the dense one), whose state and step
    counts megatronlite neither reads nor writes."""
    if m.moe.num_experts:
        raise UserError(
            "carrying an MoE run's optimizer state to or from Megatron is not supported (megatron-core keeps the "
            "experts' in an optimizer of their own): pass --weights-only to convert the weights alone"
        )


def _carried_run_config(ckpt: Checkpoint, args: dict, path: Path, directory: Path) -> Config:
    """The converted run's config with the source run's length, batches, seed and LR schedule (from its args), so
    that training on from its iteration continues Megatron's schedule; what did not map is noted."""
    from megatronlite.from_megatron import run_settings

    settings, report = run_settings(args, str(directory), ckpt.cfg.model.max_seq_len)
    raw = ckpt.cfg.to_dict()
    for section, values in settings.items():
        raw[section].update(values)
    unmapped = ", ".join(item.split(" ")[0] for item in report.unmapped)
    also = f"; unmapped: {unmapped}" if unmapped else ""
    ckpt.notes.append(
        f"the run's length, batches, seed and LR schedule come from its args{also} "
        f"(`megatronlite config from-megatron {path}` lists every flag)"
    )
    return config_mod.from_dict(raw)


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    m = ckpt.cfg.model
    tp, pp, ep = options.megatron_tp, options.megatron_pp, options.megatron_ep
    ffn = [m.ffn_size] + ([m.expert_ffn_size, m.moe.shared_expert_ffn_hidden_size] if m.moe.num_experts else [])
    if m.kv_heads % tp or any(f % tp for f in ffn) or m.num_layers % pp:
        sizes = " and ".join(str(f) for f in ffn if f)
        raise UserError(
            f"--megatron-tp {tp} must divide the KV heads ({m.kv_heads}) and FFN sizes ({sizes}), "
            f"--megatron-pp {pp} the layers ({m.num_layers})"
        )
    if ep > 1 and (not m.moe.num_experts or m.moe.num_experts % ep):
        raise UserError(f"--megatron-ep {ep} must divide the experts ({m.moe.num_experts})")
    training = ckpt.training
    if training is not None:
        refuse_moe_run(m)
    if training is not None and options.megatron_format != "torch_dist":
        raise UserError(
            "--megatron-format torch cannot carry Adam's state (the legacy format indexes it by parameter position): "
            "write torch_dist, or pass --weights-only to convert the weights alone"
        )
    dtype = output_dtype(ckpt, options)
    padded = m.padded_vocab_size(tp)
    args = make_args(m, padded, dtype, options)
    if training is not None:
        vars(args).update(training_args(ckpt, training))
    tag = RELEASE if training is None else str(training.step)
    directory = dst / (RELEASE if training is None else f"iter_{training.step:07d}")
    directory.mkdir(parents=True)
    rules = mapping(m, padded, spec=options.megatron_spec)
    if options.megatron_format == "torch_dist":
        megatron_dist.write(directory, rules, ckpt, args, dtype)
    else:
        megatron_legacy.write(directory, rules, ckpt, args, dtype, options.megatron_spec)
    (dst / TRACKER).write_text(tag)
