"""One typed config for a run: YAML in, validated dataclasses out.

A config file may name a base file with `extends:` (resolved relative to itself); command-line
`--set a.b=value` overrides are parsed as YAML so numbers, lists and dicts work. Every problem
raises `UserError` naming the key and what would be valid, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatronlite.errors import UserError, unknown_key

# The value of every feature a family's preset does not name: llama's.
FEATURE_DEFAULTS: dict[str, Any] = dict(
    norm="rmsnorm",
    activation="swiglu",
    position="rope",
    rope_theta=10000.0,
    bias=False,
    qkv_bias=None,  # as `bias`
    qk_norm=False,
    tie_embeddings=False,
    norm_eps=1e-5,
)
# What `model.arch` fills in for every feature left null: a family is a preset, not a branch in the code.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "gpt2": dict(norm="layernorm", activation="gelu", position="learned", bias=True, tie_embeddings=True),
    "qwen2": dict(rope_theta=1e6, qkv_bias=True, norm_eps=1e-6),
    "qwen3": dict(rope_theta=1e6, qk_norm=True, norm_eps=1e-6),
    "mistral": dict(rope_theta=1e6),
}
# rope_scaling's keys per type (HF's rope_parameters names) and their defaults; `...`: required
ROPE_SCALING: dict[str, dict[str, Any]] = {
    "llama3": dict(factor=..., low_freq_factor=..., high_freq_factor=..., original_max_position_embeddings=...),
    "yarn": dict(
        factor=..., original_max_position_embeddings=..., beta_fast=32.0, beta_slow=1.0, attention_factor=None
    ),
}


@dataclass
class MoEConfig:
    """Mixture of experts in place of the MLP (`num_experts` > 0), as Mixtral, Qwen3-MoE and DeepSeek-V3 build it."""

    num_experts: int = 0  # 0: every layer has a dense MLP
    top_k: int = 2  # experts each token goes to
    ffn_hidden_size: int | None = None  # of one expert; null: model.ffn_hidden_size
    layer_freq: int | list = 1  # an MoE layer every N layers from layer 0, or a 0/1 list with one entry per layer
    shared_expert_ffn_hidden_size: int = 0  # a dense MLP every token also goes through (0: none)
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . w) (Qwen2-MoE)
    router: str = "softmax"  # softmax (Mixtral, Qwen) | sigmoid (DeepSeek-V3) scores of the experts
    normalize_top_k: bool = True  # the chosen experts' weights rescaled to sum to 1
    scaling_factor: float = 1.0  # the routed experts' weights times this (DeepSeek-V3: 2.5)
    aux_loss_coeff: float = 0.0  # load-balancing loss (Switch/GShard form) per MoE layer
    # the assignment shares of that loss: micro_batch (each micro-batch's, over its whole sequences; Megatron's
    # aux_loss) | global (summed over the DP x CP ranks and averaged over the step's micro-batches so far;
    # Megatron's global_aux_loss)
    aux_loss_scope: str = "micro_batch"
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE): mean squared log-sum-exp of the router logits
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3): per step, each expert's selection
    # bias moves by this towards the mean load; 0: no bias
    capacity_factor: float | None = None  # null: dropless; else each expert takes at most this x its fair share

    def layers(self, num_layers: int) -> list[bool]:
        """Which layers are MoE layers (Megatron's --moe-layer-freq)."""
        if self.num_experts == 0:
            return [False] * num_layers
        if isinstance(self.layer_freq, list):
            return [bool(x) for x in self.layer_freq]
        return [i % self.layer_freq == 0 for i in range(num_layers)]


@dataclass
class ModelConfig:
    """The model's shape and features. A null feature takes the value of the `arch` family's preset (`FAMILIES`),
    so `arch: qwen3` plus shapes is a Qwen3 and any feature can still be set key by key."""

    arch: str = "llama"  # the preset of null features: llama | gpt2 | qwen2 | qwen3 | mistral
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size / num_heads (Qwen3 and Mistral may differ)
    ffn_hidden_size: int | None = None  # None: 4h (gelu) or 8h/3 rounded up to 256 (swiglu)
    vocab_size: int = 257  # the tokenizer's size; padded internally, never visible outside
    max_seq_len: int = 1024
    norm: str | None = None  # rmsnorm | layernorm
    norm_eps: float | None = None
    activation: str | None = None  # swiglu (gated SiLU) | gelu (tanh approximation, GPT-2's)
    position: str | None = None  # rope | learned (absolute position embeddings)
    rope_theta: float | None = None
    rope_scaling: dict | None = None  # null | {type: llama3 | yarn, factor, original_max_position_embeddings, ...}
    bias: bool | None = None  # biases on every linear layer (not the output layer)
    qkv_bias: bool | None = None  # biases on the QKV projection; null: as `bias` (Qwen2: true alone)
    qk_norm: bool | None = None  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # a token sees itself and the window - 1 before it; null: full causal
    tie_embeddings: bool | None = None
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        preset = FAMILIES.get(self.arch, {})  # an unknown arch is reported by `validate`
        for name, default in FEATURE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, preset.get(name, default))
        if self.qkv_bias is None:
            self.qkv_bias = self.bias

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """The size of one attention head (`head_dim`, or hidden_size / num_heads)."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "gelu":
            return 4 * self.hidden_size
        return 256 * math.ceil(8 * self.hidden_size / 3 / 256)

    @property
    def expert_ffn_size(self) -> int:
        return self.moe.ffn_hidden_size or self.ffn_size

    @property
    def tied(self) -> bool:
        return bool(self.tie_embeddings)

    @property
    def gated(self) -> bool:
        """Whether the MLP's first layer has two halves (gate and up)."""
        return self.activation == "swiglu"

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1  # CP: each sequence split over this many ranks (Megatron's --context-parallel-size)
    context_attention: str = "ring"  # ring (K/V blocks passed around, overlapped) | allgather (all K/V at once)
    expert: int = 1  # EP: the experts of each MoE layer split over this many of the dp x cp ranks
    virtual_pipeline: int = 1
    sequence_parallel: bool = False
    # 0: plain DP | 1: optimizer states sharded over DP (ZeRO-1, Megatron's distributed optimizer) | 2: gradients
    # too, reduce-scattered into each rank's shard during backward | 3: parameters too (engine deepspeed);
    # null: 1 with distributed_optimizer, else 0
    zero_stage: int | None = None
    engine: str = "native"  # who syncs gradients and steps: native (megatronlite) | deepspeed (its ZeRO engine)
    distributed_optimizer: bool = False  # a synonym of zero_stage: 1
    # 1f1b | interleaved | gpipe | zero_bubble; null: interleaved with virtual stages, else 1f1b (as Megatron)
    pipeline_schedule: str | None = None
    pipeline_layers: list | None = None  # layers per stage (P x virtual entries); None: an even split
    bucket_mb: float = 25.0  # DP gradient bucket size

    @property
    def zero(self) -> int:
        """The ZeRO stage that runs (`zero_stage`, or what `distributed_optimizer` implies)."""
        return self.zero_stage if self.zero_stage is not None else int(self.distributed_optimizer)

    @property
    def schedule(self) -> str:
        """The pipeline schedule that runs: the one named, or what the virtual stages imply."""
        return self.pipeline_schedule or ("interleaved" if self.virtual_pipeline > 1 else "1f1b")

    timeout_minutes: float = 10.0  # no progress this long ends the job with a clue (train/watchdog.py)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_len: int = 256
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    recompute: str = "none"  # none | selective (attention core) | full (whole layers)
    recompute_layers: int = 0  # full: recompute the first N layers of each stage (0: all)
    kernels: str | dict = "auto"  # one choice for every op, or {op: auto|torch|triton|apex|te}
    compile: bool = False  # torch.compile each transformer block
    tf32: bool = True  # CUDA: fp32 matmuls run on TF32 tensor cores (10-bit mantissa); false: full fp32 (IEEE)
    eval_interval: int = 0  # 0: no periodic eval
    eval_iters: int = 4
    threads: int = 0  # CPU intra-op threads, 0: torch's default
    on_nonfinite: str = "stop"  # stop | skip: a step whose loss or gradients are NaN/inf (train/guards.py)
    # skipped steps in a row (non-finite, fp16 overflow at min scale), or spike rewinds that never get past the
    # step they went back from, before stopping
    max_skipped_steps: int = 10
    loss_spike_factor: float = 0.0  # a loss above this x the recent mean is a spike; 0: no spike detection
    on_loss_spike: str = "stop"  # stop | rewind (to the last checkpoint, skipping the batches since)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0: no clipping
    impl: str = "auto"  # auto | torch (foreach) | fused (torch's fused) | triton | apex
    # where Adam's moments (and with ZeRO-3 the parameters) live: none | cpu (the step on the CPU, optim/offload.py
    # or DeepSpeed's CPU Adam) | nvme (engine deepspeed, under optim.nvme_path); true / false: cpu / none
    offload: str | bool = "none"
    nvme_path: str | None = None  # nvme offload: a directory on a local NVMe drive
    initial_loss_scale: float = 65536.0  # fp16 only

    @property
    def offload_to(self) -> str:
        """Where the offload goes: none | cpu | nvme (the boolean synonyms resolved)."""
        return {True: "cpu", False: "none"}.get(self.offload, self.offload)


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: [{"path": "builtin:stdlib", "weight": 1.0}])
    tokenizer: str = "byte"  # byte | path to a tokenizer.json (or its directory)
    split: str = "98,2"  # train,valid weights
    cache_dir: str | None = None  # null: $XDG_CACHE_HOME/megatronlite, else ~/.cache/megatronlite
    # packed samples: attention stays inside each document and positions restart after every end-of-document
    # token (Megatron's --reset-attention-mask --reset-position-ids)
    document_mask: bool = False
    eod_mask_loss: bool = False  # no loss where the input token is end-of-document (Megatron's --eod-mask-loss)


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0: only at the end of training
    keep: int = 3  # the newest N complete checkpoints stay; 0: all stay
    keep_every: int = 0  # 0: none kept permanently
    load: str | None = "auto"  # auto | null (fresh weights) | a path; the run directory's own checkpoint wins
    save: bool = True
    # `async` is a Python keyword; YAML and --set use `checkpoint.async`
    async_save: bool = False
    required: bool = False  # a failed save stops the run (default: reported once, training goes on)


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: dict | None = None
    tensorboard: bool = False  # event files in RUN_DIR/tensorboard, the same scalars as metrics.jsonl


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # parallel.engine deepspeed: a DeepSpeed config merged over the one megatronlite generates (the knobs it does
    # not model); keys that decide the numbers megatronlite owns (batch sizes, precision, ZeRO stage) are refused
    deepspeed: dict | None = None

    def to_dict(self) -> dict:
        return _to_yaml_names(dataclasses.asdict(self))


CHOICES = {
    "model.arch": tuple(FAMILIES),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.activation": ("swiglu", "gelu"),
    "model.position": ("rope", "learned"),
    "model.moe.aux_loss_scope": ("micro_batch", "global"),
    "parallel.context_attention": ("ring", "allgather"),
    "parallel.pipeline_schedule": (None, "1f1b", "interleaved", "gpipe", "zero_bubble"),
    "parallel.zero_stage": (None, 0, 1, 2, 3),
    "parallel.engine": ("native", "deepspeed"),
    "optim.offload": (False, True, "none", "cpu", "nvme"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.recompute": ("none", "selective", "full"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.on_loss_spike": ("stop", "rewind"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "optim.impl": ("auto", "torch", "fused", "triton", "apex"),
}

_YAML_NAME = {"async_save": "async"}
_FIELD_NAME = {v: k for k, v in _YAML_NAME.items()}


def _to_yaml_names(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_YAML_NAME.get(k, k): _to_yaml_names(v) for k, v in obj.items()}
    return obj


class YamlLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, plus floats written without a dot or an exponent sign (`1e-4`, `3E-5`, `1e4`).

    PyYAML follows YAML 1.1, which reads those as strings, yet every Megatron user writes a learning rate so.
    The safe loader builds plain Python values only, never arbitrary objects; and an alias may name a scalar
    only: aliases of lists or mappings nest (a "billion laughs" file) into gigabytes from a few lines.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.SequenceNode | yaml.MappingNode):
                problem = f"the alias *{event.anchor} names a list or mapping; aliases may name plain values only"
                raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
        return super().compose_node(parent, index)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as plain Python values, with `1e-4` a float (see `YamlLoader`)."""
    return yaml.load(text, Loader=YamlLoader)


def read_text(path: Path, what: str) -> str:
    """A text file someone else made (`what` names it in the message): unreadable or not UTF-8 is one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or type(e).__name__})") from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's values; a syntax error or refused alias is one line naming the file and line."""
    try:
        return parse_yaml(read_text(path, what))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """The YAML of `path` merged over its `extends:` chain, as a plain dict."""
    path = Path(path).resolve()
    if path in _seen:
        raise UserError(f"{path}: `extends` makes a cycle")
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: `extends` must be a path string, got {base!r}")
    return _merge(load_raw(path.parent / base, _seen + (path,)), data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings; the value is YAML (`x=[1,2]`, `y=null`)."""
    raw = _merge({}, raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, for example train.steps=100")
        try:
            parsed = parse_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parsed
    return raw


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check `value` against a field's type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if hint is int and isinstance(value, bool):
        return False, value
    base = origin or hint
    return isinstance(value, base), value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [_YAML_NAME.get(f.name, f.name) for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise unknown_key(key, names, prefix)
        fname = _FIELD_NAME.get(key, key)
        ftype = hints[fname]
        if dataclasses.is_dataclass(ftype):
            kwargs[fname] = _build(ftype, value, f"{prefix}{key}.")
            continue
        ok, value = _type_ok(value, ftype)
        if not ok:
            raise UserError(f"config key '{prefix}{key}': expected {_type_name(ftype)}, got {value!r}")
        kwargs[fname] = value
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run's config from its YAML file and `--set` overrides, validated, its inputs checked."""
    raw = apply_overrides(load_raw(path), overrides or [])
    raw.setdefault("name", Path(path).stem)
    cfg = from_dict(raw)
    check_inputs(cfg)
    return cfg


def run_dir(cfg: Config, given: str | None) -> Path:
    """The run directory: `--run-dir` when given, else runs/<config name> (every command and worker agrees)."""
    return Path(given or Path("runs") / cfg.name)


def check_inputs(cfg: Config) -> None:
    """Paths a run starts from must exist (before any worker starts). Not part of `validate`: a
    saved run's config stays loadable after the checkpoint it once started from is gone."""
    load = cfg.checkpoint.load
    if load not in (None, "auto") and not Path(load).exists():
        raise UserError(
            f"checkpoint.load: path does not exist: {load} (give a run directory, its checkpoints/ "
            "directory or a step directory; or auto, or null)"
        )


def _finite(value: Any, key: str) -> None:
    """Every float anywhere in the config, nested ones included: NaN passes every sign and range check."""
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value}")


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _fraction(value: float, key: str, include_one: bool = False) -> None:
    if not (0 <= value <= 1 if include_one else 0 <= value < 1):
        raise UserError(f"config key '{key}' must be in [0, 1{']' if include_one else ')'}, got {value}")


# keys checked by sign alone, by section; an unset optional key (None) takes its default
_POSITIVE = {
    "model": "num_layers hidden_size num_heads num_kv_heads head_dim ffn_hidden_size vocab_size max_seq_len norm_eps "
    "rope_theta sliding_window init_std make_vocab_size_divisible_by",
    "parallel": "tensor pipeline context expert virtual_pipeline bucket_mb timeout_minutes",
    "train": "steps micro_batch_size global_batch_size seq_len eval_iters",
    "optim": "lr eps initial_loss_scale",
    "logging": "interval",
}
_NON_NEGATIVE = {
    "train": "eval_interval recompute_layers threads max_skipped_steps loss_spike_factor",
    "optim": "min_lr warmup_steps weight_decay clip_grad",
    "checkpoint": "interval keep keep_every",
}


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check values alone and against each other; with `world_size`, the parallel layout too."""
    _finite(cfg.to_dict(), "")
    for key, allowed in CHOICES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"config key '{key}' = {value!r}; valid values: {shown}")
    m, t, o = cfg.model, cfg.train, cfg.optim
    for allow_zero, keys in ((False, _POSITIVE), (True, _NON_NEGATIVE)):
        for section, names in keys.items():
            for name in names.split():
                value = getattr(getattr(cfg, section), name)
                if value is not None:
                    _positive(value, f"{section}.{name}", allow_zero)
    _fraction(o.beta1, "optim.beta1")
    _fraction(o.beta2, "optim.beta2")
    _fraction(o.decay_fraction, "optim.decay_fraction", include_one=True)
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        divisors = [d for d in range(1, m.hidden_size + 1) if m.hidden_size % d == 0 and d <= 4 * m.num_heads]
        raise UserError(
            f"model.num_heads ({m.num_heads}) must divide model.hidden_size ({m.hidden_size}); "
            f"valid head counts near it: {', '.join(map(str, divisors[-4:]))}"
        )
    if m.num_heads % m.kv_heads:
        raise UserError(f"model.num_kv_heads ({m.kv_heads}) must divide model.num_heads ({m.num_heads})")
    if m.position == "rope" and m.head_size % 2:
        raise UserError(
            f"rotary embeddings need an even head size; model.head_dim (or hidden_size/num_heads) = {m.head_size}"
        )
    validate_rope_scaling(m)
    validate_moe(m)
    if t.seq_len > m.max_seq_len:
        raise UserError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if (
        cfg.data.eod_mask_loss
        and isinstance(t.kernels, dict)
        and t.kernels.get("linear_cross_entropy", "auto") != "auto"
    ):
        raise UserError(
            "data.eod_mask_loss needs the unfused loss, but train.kernels names linear_cross_entropy "
            f"({t.kernels['linear_cross_entropy']}); drop that key or set it to auto"
        )
    validate_zero(cfg.parallel)
    validate_engine(cfg)
    validate_wandb(cfg.logging.wandb)
    validate_kernels(t.kernels)
    if not cfg.data.sources:
        raise UserError("data.sources is empty; give at least one {path: PREFIX, weight: W}")
    if world_size is not None:
        validate_layout(cfg, world_size)
    else:  # the data-parallel size is not known yet: at least one micro-batch per step
        _check_batch(t, 1)


def validate_moe(m: ModelConfig) -> None:
    """The experts' counts, router and layer pattern (`model.moe`)."""
    e = m.moe
    if e.num_experts < 0:
        raise UserError(f"model.moe.num_experts must be >= 0 (0: dense), got {e.num_experts}")
    if e.num_experts == 0:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise UserError(f"model.moe.top_k must be between 1 and num_experts ({e.num_experts}), got {e.top_k}")
    if e.router not in ("softmax", "sigmoid"):
        raise UserError(f"model.moe.router = {e.router!r}; valid values: softmax, sigmoid")
    for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate", "shared_expert_ffn_hidden_size"):
        _positive(getattr(e, name), f"model.moe.{name}", allow_zero=True)
    for name in ("ffn_hidden_size", "capacity_factor", "scaling_factor"):
        if getattr(e, name) is not None:
            _positive(getattr(e, name), f"model.moe.{name}")
    if e.shared_expert_gate and not e.shared_expert_ffn_hidden_size:
        raise UserError("model.moe.shared_expert_gate needs a shared expert (model.moe.shared_expert_ffn_hidden_size)")
    freq = e.layer_freq
    if isinstance(freq, list):
        if len(freq) != m.num_layers or any(x not in (0, 1) for x in freq):
            raise UserError(f"model.moe.layer_freq as a list needs one 0 or 1 per layer ({m.num_layers}), got {freq}")
    elif isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise UserError(f"model.moe.layer_freq must be a positive integer or a 0/1 list per layer, got {freq!r}")


# keys of a `deepspeed:` section that would change what megatronlite's own settings decide
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / micro_batch_size / DP",
    "gradient_clipping": "optim.clip_grad",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "optimizer": "optim.* (megatronlite's AdamW)",
    "scheduler": "optim.schedule",
}

# The top-level keys DeepSpeed's config reads (deepspeed 0.19: runtime/config.py DeepSpeedConfig, its __init__ and
# _initialize_params, and the monitor/profiler/autotuning/aio configs it builds from the same dict); keys it has
# removed (its _REMOVED_TOP_LEVEL_CONFIG_KEYS) are not here. tests/test_config.py checks this list against the
# installed DeepSpeed, so a new release that reads another key fails a test rather than a user's config.
DEEPSPEED_KEYS = (
    "activation_checkpointing",
    "aio",
    "autotuning",
    "bf16",
    "bfloat16",
    "checkpoint",
    "comet",
    "comms_logger",
    "communication_data_type",
    "compile",
    "csv_monitor",
    "data_efficiency",
    "data_types",
    "dataloader_drop_last",
    "datastates_ckpt",
    "disable_allgather",
    "disable_python_gc",
    "dump_state",
    "expert_parallel",
    "flops_profiler",
    "fp16",
    "gradient_accumulation_steps",
    "gradient_allreduce_op",
    "gradient_clipping",
    "gradient_predivide_factor",
    "hybrid_engine",
    "log_level",
    "managed_gradient_accumulation",
    "memory_breakdown",
    "optimizer",
    "pipeline",
    "prescale_gradients",
    "scheduler",
    "seq_parallel_communication_data_type",
    "sequence_parallel_size",
    "steps_per_print",
    "tensor_parallel",
    "tensorboard",
    "timers",
    "torch_autocast",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism",
    "vocabulary_size",
    "wall_clock_breakdown",
    "wandb",
    "weight_quantization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "zero_optimization",
)


def validate_engine(cfg: Config) -> None:
    """What each engine runs (`parallel.engine`, engine/): the ZeRO stage, offload and the layouts."""
    p, o, native = cfg.parallel, cfg.optim, cfg.parallel.engine == "native"
    if o.offload_to == "nvme" and o.nvme_path is None:
        raise UserError("optim.offload: nvme needs optim.nvme_path (a directory on a local NVMe drive)")
    if native:
        if p.zero == 3:
            raise UserError("parallel.zero_stage: 3 (parameters sharded too) runs on parallel.engine: deepspeed")
        if o.offload_to == "nvme":
            raise UserError("optim.offload: nvme runs on parallel.engine: deepspeed (native offloads to cpu)")
        if cfg.deepspeed is not None:
            raise UserError("the deepspeed: section is read only with parallel.engine: deepspeed")
        return
    refusals = {
        "parallel.zero_stage": (p.zero == 0, "must be 1, 2 or 3 with the deepspeed engine (0: parallel.engine native)"),
        "parallel.pipeline": (p.pipeline > 1, "> 1 runs on the native engine (DeepSpeed's ZeRO-2/3 refuse pipelines)"),
        "parallel.expert": (p.expert > 1, "> 1 runs on the native engine (DeepSpeed's MoE groups are not ours)"),
        "parallel.sequence_parallel": (
            p.sequence_parallel,
            "runs on the native engine (its norms' gradients are summed over TP before the DP reduction)",
        ),
        "train.on_nonfinite": (
            cfg.train.on_nonfinite == "skip",
            "skip needs the gradient norm before the step, which DeepSpeed computes inside it: native engine",
        ),
        "optim.impl": (o.impl in ("triton", "apex"), f"{o.impl} runs on the native engine (DeepSpeed steps torch's)"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise UserError(f"parallel.engine: deepspeed: {key} {why}")
    validate_deepspeed_section(cfg.deepspeed or {})


def validate_deepspeed_section(section: dict) -> None:
    """The `deepspeed:` section: keys DeepSpeed knows and megatronlite does not decide, and a mapping where it
    merges its own settings (engine/deepspeed_zero.py), so a typo or a scalar is named now, not deep in DeepSpeed."""
    for key in section:
        if key in DEEPSPEED_OWNED_KEYS:
            raise UserError(
                f"deepspeed.{key} is decided by megatronlite's {DEEPSPEED_OWNED_KEYS[key]}; set that instead"
            )
        if key not in DEEPSPEED_KEYS:
            raise unknown_key(key, [k for k in DEEPSPEED_KEYS if k not in DEEPSPEED_OWNED_KEYS], "deepspeed.")
    zero = section.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        raise UserError(f"config key 'deepspeed.zero_optimization': expected a mapping of ZeRO settings, got {zero!r}")
    if "stage" in (zero or {}):
        raise UserError("deepspeed.zero_optimization.stage is decided by parallel.zero_stage; set that instead")


def validate_zero(p: ParallelConfig) -> None:
    """The ZeRO stage against its synonym and the pipeline."""
    if p.zero_stage == 0 and p.distributed_optimizer:
        raise UserError("parallel.zero_stage: 0 contradicts parallel.distributed_optimizer: true (zero_stage 1)")
    if p.zero == 2 and p.pipeline > 1:
        raise UserError(
            "parallel.zero_stage: 2 runs without pipeline parallelism (parallel.pipeline = "
            f"{p.pipeline}): its gradients are reduce-scattered per micro-batch; use zero_stage 1 with a pipeline"
        )


def validate_rope_scaling(m: ModelConfig) -> None:
    """`model.rope_scaling`: null, or a known type with its required keys and no unknown ones, on a rope model."""
    scaling = m.rope_scaling
    if scaling is None:
        return
    kind = scaling.get("type")
    if kind not in ROPE_SCALING:
        raise UserError(f"config key 'model.rope_scaling.type' = {kind!r}; valid values: {', '.join(ROPE_SCALING)}")
    if m.position != "rope":
        raise UserError(f"model.rope_scaling is set but model.position is {m.position!r}; it scales rotary embeddings")
    keys = ROPE_SCALING[kind]
    for key, value in scaling.items():
        if key != "type" and key not in keys:
            raise unknown_key(key, ["type", *keys], "model.rope_scaling.")
        if key != "type" and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config key 'model.rope_scaling.{key}': expected a number, got {value!r}")
            _positive(value, f"model.rope_scaling.{key}")
    missing = [k for k, default in keys.items() if default is ... and k not in scaling]
    if missing:
        raise UserError(f"model.rope_scaling of type {kind} needs {', '.join(missing)}")


def _check_batch(t: TrainConfig, dp: int) -> None:
    step = t.micro_batch_size * dp
    if t.global_batch_size % step:
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size x "
            f"data-parallel size ({t.micro_batch_size} x {dp} = {step}); valid: "
            f"{', '.join(str(step * k) for k in range(1, 5))}, ..."
        )


def precision_on(t: TrainConfig, device_type: str, bf16_supported: bool = True) -> str:
    """What `train.precision` means on a device: `auto` is bf16 on a GPU that has it (Ampere and later: the
    tensor-core rate, and Megatron's usual choice), fp32 elsewhere (CPU: bf16 matmuls gain nothing there)."""
    if t.precision != "auto":
        return t.precision
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def micro_batches(t: TrainConfig, dp: int) -> int:
    """Micro-batches each DP rank runs per step (gradient accumulation); 0 when the batch does not divide."""
    per_step = t.micro_batch_size * dp
    return t.global_batch_size // per_step if t.global_batch_size % per_step == 0 else 0


def validate_kernels(choices: str | dict) -> None:
    from megatronlite.kernels import IMPLS, OPS

    items = choices.items() if isinstance(choices, dict) else [("*", choices)]
    for op, impl in items:
        if op == "adamw":  # one setting for the optimizer
            raise UserError("train.kernels.adamw: the optimizer is set by optim.impl (auto|torch|fused|triton|apex)")
        if op != "*" and op not in OPS:
            raise UserError(f"unknown kernel op 'train.kernels.{op}'; valid ops: {', '.join(OPS)}")
        if impl not in IMPLS:
            raise UserError(f"train.kernels{'' if op == '*' else '.' + op} = {impl!r}; valid: {', '.join(IMPLS)}")


WANDB_KEYS = ("mode", "project", "entity", "group", "name")
WANDB_MODES = ("disabled", "offline", "online")


def validate_wandb(settings: dict | None) -> None:
    if settings is None:
        return
    for key in settings:
        if key not in WANDB_KEYS:
            raise unknown_key(key, WANDB_KEYS, "logging.wandb.")
    if settings.get("mode", "offline") not in WANDB_MODES:
        raise UserError(f"logging.wandb.mode = {settings['mode']!r}; valid values: {', '.join(WANDB_MODES)}")


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check the TP x PP x CP x DP layout for `world_size` workers; return the DP size."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    model_ranks = p.tensor * p.pipeline * p.context
    if world_size % model_ranks:
        raise UserError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
            f"({p.tensor} x {p.pipeline} x {p.context}); use a world size that is a multiple of {model_ranks}"
        )
    if m.num_heads % p.tensor or m.kv_heads % p.tensor:
        ok = [d for d in range(1, m.kv_heads + 1) if m.kv_heads % d == 0 and m.num_heads % d == 0]
        raise UserError(
            f"parallel.tensor ({p.tensor}) must divide model.num_heads ({m.num_heads}) and "
            f"model.num_kv_heads ({m.kv_heads}); valid: {', '.join(map(str, ok))}"
        )
    if m.ffn_size % p.tensor:
        raise UserError(f"parallel.tensor ({p.tensor}) must divide the FFN size ({m.ffn_size})")
    if p.expert > 1:
        replicas = world_size // model_ranks  # dp x cp: expert parallelism is carved out of them
        if not m.moe.num_experts or m.moe.num_experts % p.expert:
            raise UserError(
                f"parallel.expert ({p.expert}) must divide model.moe.num_experts ({m.moe.num_experts}); it splits "
                "the experts of each MoE layer over that many ranks"
            )
        if (replicas * p.context) % p.expert:
            ok = [d for d in range(1, replicas * p.context + 1) if (replicas * p.context) % d == 0]
            raise UserError(
                f"parallel.expert ({p.expert}) must divide data x context parallel ranks ({replicas} x {p.context} "
                f"on {world_size} workers); valid: {', '.join(map(str, ok))}"
            )
    stages = p.pipeline * p.virtual_pipeline
    if p.pipeline_layers is not None:
        counts = p.pipeline_layers
        counts_ok = all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
        if not counts_ok or len(counts) != stages or sum(counts) != m.num_layers:  # summed once they are ints
            raise UserError(
                f"parallel.pipeline_layers = {counts} must list {stages} positive layer counts "
                f"(parallel.pipeline x parallel.virtual_pipeline) summing to model.num_layers ({m.num_layers})"
            )
    elif m.num_layers % stages:
        raise UserError(
            f"model.num_layers ({m.num_layers}) must divide over parallel.pipeline x "
            f"parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline} = {stages} stages), "
            f"or set parallel.pipeline_layers"
        )
    if p.virtual_pipeline > 1 and p.pipeline == 1:
        raise UserError(
            f"parallel.virtual_pipeline = {p.virtual_pipeline} needs parallel.pipeline > 1: virtual stages are "
            "chunks of each pipeline rank's layers (set parallel.virtual_pipeline: 1)"
        )
    if p.virtual_pipeline > 1 and p.schedule not in ("interleaved", "zero_bubble"):
        raise UserError(
            f"parallel.virtual_pipeline = {p.virtual_pipeline} needs parallel.pipeline_schedule interleaved or "
            f"zero_bubble (or leave it unset), not {p.schedule}"
        )
    if p.context > 1 and t.seq_len % (2 * p.context):
        raise UserError(
            f"context parallelism splits each sequence into 2 x parallel.context ({2 * p.context}) equal chunks: "
            f"train.seq_len ({t.seq_len}) must be divisible by {2 * p.context}"
        )
    if p.sequence_parallel and (t.seq_len // p.context) % p.tensor:
        raise UserError(
            f"sequence parallel needs each rank's sequence (train.seq_len / parallel.context = "
            f"{t.seq_len // p.context}) divisible by parallel.tensor ({p.tensor})"
        )
    dp = world_size // model_ranks
    n_micro = micro_batches(t, dp)
    if p.schedule in ("interleaved", "zero_bubble") and p.pipeline > 1 and n_micro % p.pipeline:
        raise UserError(
            f"the interleaved schedule needs micro-batches per step ({n_micro}) divisible by parallel.pipeline "
            f"({p.pipeline}); change train.global_batch_size"
        )
    if p.schedule == "1f1b" and p.pipeline > 1 and n_micro < p.pipeline:
        raise UserError(
            f"the 1f1b schedule needs at least parallel.pipeline ({p.pipeline}) micro-batches per step, not {n_micro}: "
            "raise train.global_batch_size or lower train.micro_batch_size (or use parallel.pipeline_schedule: gpipe)"
        )
    _check_batch(t, dp)
    return dp


def to_yaml(cfg: Config) -> str:
    """The resolved config as the run directory's config.yaml holds it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
