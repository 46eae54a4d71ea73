"""Megatron-LM's command-line flags: the ones megatronlite maps, and the ones it knows it does not.

Each flag has Megatron's `args` attribute (its dest), a value kind and Megatron-LM's default, so a command
line and the `args` a checkpoint stores read the same way: a flag not given holds its default. A flag
megatronlite has no equivalent for is `unmapped` (the run differs) or `ignored` (kernels, overlap, logging:
the run's math is the same), each with the reason the report prints. A group can be inert unless another
arg is set (`when`): the MoE flags do nothing without `--num-experts`, so a dense model's defaults of
them are not differences. Flags not in these tables are reported as unknown, never dropped.

Megatron-LM's parser takes no positional arguments, so every word after a flag up to the next `--flag`
is that flag's value: a command line splits correctly even where a flag is unknown here.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from megatronlite.errors import UserError

KINDS = ("true", "false", "int", "float", "str", "list", "tuple", "any")


@dataclass(frozen=True)
class Flag:
    name: str  # as written after "--"
    dest: str  # Megatron-LM's args attribute
    kind: str  # true / false: a switch (store_true / store_false); list: nargs; any: kept as written
    default: Any  # what args holds when the flag is not given
    role: str  # mapped | ignored | unmapped
    why: str = ""
    when: str | None = None  # the group matters only when this arg is set (else: no effect)


# name[,alias] kind [default] [>dest]; a default is a Python literal, `-` for None
MAPPED = """
num-layers int
hidden-size int
ffn-hidden-size int
num-attention-heads int
group-query-attention true
num-query-groups int 1
kv-channels int
seq-length int
max-position-embeddings int
position-embedding-type str 'learned_absolute'
use-rotary-position-embeddings true
no-position-embedding false True >add_position_embedding
rotary-base int 10000
rotary-percent float 1.0
rotary-interleaved true
rotary-seq-len-interpolation-factor int
use-rope-scaling true
rope-scaling-factor float 8.0
normalization str 'LayerNorm'
norm-epsilon float 1e-05
apply-layernorm-1p true
swiglu true
openai-gelu true
squared-relu true
quick-geglu true
disable-bias-linear false True >add_bias_linear
add-qkv-bias true
qk-layernorm true
untie-embeddings-and-output-weights true
window-size tuple
window-attn-skip-freq str
softmax-type str 'vanilla'
num-experts int
moe-router-topk int 2
moe-ffn-hidden-size int
moe-layer-freq any 1
moe-shared-expert-intermediate-size int
moe-shared-expert-gate true
moe-router-score-function str 'softmax'
moe-router-pre-softmax true
moe-router-topk-scaling-factor float
moe-aux-loss-coeff float 0.0
moe-z-loss-coeff float
moe-router-load-balancing-type str 'aux_loss'
moe-router-enable-expert-bias true
moe-router-bias-update-rate float 0.001
moe-expert-capacity-factor float
expert-model-parallel-size int 1
expert-tensor-parallel-size int
multi-latent-attention true
vocab-size int
make-vocab-size-divisible-by int 128
init-method-std float 0.02
attention-dropout float 0.1
hidden-dropout float 0.1
tensor-model-parallel-size int 1
pipeline-model-parallel-size int 1
num-layers-per-virtual-pipeline-stage int
num-virtual-stages-per-pipeline-rank int
decoder-first-pipeline-num-layers int
decoder-last-pipeline-num-layers int
context-parallel-size int 1
cp-comm-type list ['p2p']
sequence-parallel true
use-distributed-optimizer true
recompute-activations true
recompute-granularity str
recompute-method str
recompute-num-layers int
micro-batch-size int
global-batch-size int
train-iters int
train-samples int
seed int 1234
bf16 true
fp16 true
eval-interval int 1000
eval-iters int 100
lr float
min-lr float 0.0
lr-decay-style str 'linear'
lr-decay-iters int
lr-decay-samples int
lr-warmup-iters int 0
lr-warmup-samples int 0
lr-warmup-fraction float
lr-warmup-init float 0.0
lr-wsd-decay-style str 'exponential'
lr-wsd-decay-iters int
lr-wsd-decay-samples int
weight-decay float 0.01
adam-beta1 float 0.9
adam-beta2 float 0.999
adam-eps float 1e-08
clip-grad float 1.0
optimizer str 'adam'
optimizer-cpu-offload true
optimizer-offload-fraction float 1.0
loss-scale float
initial-loss-scale float 4294967296.0
min-loss-scale float 1.0
loss-scale-window float 1000.0
hysteresis int 2
data-path list
split str
tokenizer-type str
tokenizer-model str
vocab-file str
merge-file str
data-cache-path str
mock-data true
reset-position-ids true
reset-attention-mask true
eod-mask-loss true
save str
load str
save-interval,persistent-save-interval int
async-save true
log-interval int 100
tensorboard-dir str
wandb-project str ''
wandb-exp-name str ''
wandb-entity str ''
"""

MOE = "an MoE setting model.moe does not have"
# (role, why, when, flags): `prefix*` matches every flag starting so; `name=default` and `name>dest` as above
GROUPS: list[tuple[str, str, str | None, str]] = [
    (
        "ignored",
        "kernels and fusions",
        None,
        """use-flash-attn attention-backend transformer-impl='transformer_engine'
        use-mcore-models>deprecated_use_mcore_models use-legacy-models
        no-masked-softmax-fusion>masked_softmax_fusion no-bias-gelu-fusion>bias_gelu_fusion
        no-bias-swiglu-fusion>bias_swiglu_fusion no-bias-dropout-fusion>bias_dropout_fusion
        no-rope-fusion>apply_rope_fusion no-gradient-accumulation-fusion>gradient_accumulation_fusion
        no-persist-layer-norm no-async-tensor-model-parallel-allreduce>async_tensor_model_parallel_allreduce
        cross-entropy-loss-fusion cross-entropy-fusion-impl use-te-activation-func enable-cuda-graph
        external-cuda-graph cuda-graph-* use-cpu-initialization deterministic-mode moe-permute-fusion
        moe-grouped-gemm moe-router-fusion te-rng-tracker""",
    ),
    (
        "ignored",
        "communication overlap and buckets",
        None,
        """overlap-grad-reduce overlap-param-gather overlap-param-gather-with-optimizer-step
        no-align-grad-reduce>align_grad_reduce no-align-param-gather>align_param_gather ddp-* tp-comm-*
        disable-tp-comm-* defer-embedding-wgrad-compute wgrad-deferral-limit delay-wgrad-compute
        no-overlap-p2p-communication>overlap_p2p_comm overlap-p2p-communication-warmup-flush use-ring-exchange-p2p
        microbatch-group-size-per-virtual-pipeline-stage>microbatch_group_size_per_vp_stage
        no-scatter-gather-tensors-in-pipeline>scatter_gather_tensors_in_pipeline use-nccl-ub>nccl_ub use-sharp
        nccl-communicator-config-path use-tp-pp-dp-mapping distributed-backend='nccl' distributed-timeout-minutes=10
        high-priority-stream-groups overlap-moe-expert-parallel-comm
        disable-gloo-process-groups>enable_gloo_process_groups local-rank lazy-mpu-init""",
    ),
    (
        "ignored",
        "memory management",
        None,
        """manual-gc manual-gc-interval no-manual-gc-eval>manual_gc_eval empty-unused-memory-level
        distribute-saved-activations recompute-modules record-memory-history memory-snapshot-path""",
    ),
    (
        "ignored",
        "logging and profiling",
        None,
        """log-* tensorboard-log-interval tensorboard-queue-size timing-log-level timing-log-option
        no-barrier-with-level-1-timing>barrier_with_L1_time
        no-log-loss-scale-to-tensorboard>log_loss_scale_to_tensorboard wandb-save-dir logging-level profile
        profile-step-start profile-step-end profile-ranks use-pytorch-profiler no-one-logger>enable_one_logger
        one-logger-* app-tag-* config-logger-dir straggler-* disable-straggler-on-startup""",
    ),
    (
        "ignored",
        "data loading and checkpoint files",
        None,
        """num-workers=2 no-mmap-bin-files>mmap_bin_files
        no-create-attention-mask-in-dataloader>create_attention_mask_in_dataloader num-dataset-builder-threads=1
        dataloader-type object-storage-cache-path ckpt-format='torch_dist' ckpt-fully-parallel-load
        no-ckpt-fully-parallel-save>ckpt_fully_parallel_save ckpt-assume-constant-structure dist-ckpt-*
        use-dist-ckpt auto-detect-ckpt-format use-persistent-ckpt-worker exit-on-missing-checkpoint""",
    ),
    (
        "ignored",
        "fault tolerance",
        None,
        """exit-signal-handler rerun-mode='validate_results' check-for-spiky-loss check-for-large-grads
        no-check-for-nan-in-loss-and-grad>check_for_nan_in_loss_and_grad enable-ft-package calc-ft-timeouts
        inprocess-* adlr-autoresume adlr-autoresume-interval result-rejected-tracker-filename error-injection-*""",
    ),
    (
        "unmapped",
        "FP8 matmuls; megatronlite trains in bf16, fp16 or fp32",
        "fp8",
        "fp8-format>fp8 fp8-recipe='delayed' fp8-* no-fp8-wgrad>fp8_wgrad",
    ),
    (
        "unmapped",
        "FP4 matmuls; megatronlite trains in bf16, fp16 or fp32",
        "fp4",
        "fp4-format>fp4 fp4-param-gather>fp4_param fp4-*",
    ),
    (
        "unmapped",
        MOE,
        "num_experts",
        "moe-*",
    ),
    ("ignored", "MoE dispatch and kernels", "num_experts", "moe-token-dispatcher-type moe-enable-deepep"),
    ("ignored", "the router's dtype: model.moe's router is fp32", "num_experts", "moe-router-dtype"),
    ("unmapped", "multi-token prediction", "mtp_num_layers", "mtp-num-layers mtp-loss-scaling-factor=0.1"),
    (
        "unmapped",
        "multi-latent attention",
        "multi_latent_attention",
        "q-lora-rank kv-lora-rank=32 qk-head-dim=128 qk-pos-emb-head-dim=64 v-head-dim=128 rotary-scaling-factor=1.0 "
        "mscale=1.0 mscale-all-dim=0.0 cache-mla-latents",
    ),
    ("unmapped", "hybrid Mamba models", "hybrid_override_pattern", "mamba-* hybrid-* is-hybrid-model spec"),
    ("unmapped", "fill-in-the-middle data", "fim_data", "fim-data fim-*"),
    (
        "unmapped",
        "a learning-rate or weight-decay setting megatronlite's schedule does not have",
        None,
        """decoupled-lr decoupled-min-lr start-weight-decay end-weight-decay weight-decay-incr-style='constant'
        override-opt_param-scheduler,override-opt-param-scheduler>override_opt_param_scheduler
        use-checkpoint-opt_param-scheduler,use-checkpoint-opt-param-scheduler>use_checkpoint_opt_param_scheduler
        warmup""",
    ),
    (
        "unmapped",
        "batch-size ramp-up; megatronlite's global batch is constant",
        None,
        "rampup-batch-size step-batch-size-schedule decrease-batch-size-if-needed",
    ),
    (
        "unmapped",
        "numerics megatronlite does not offer",
        None,
        """grad-reduce-in-bf16 accumulate-allreduce-grads-in-fp32 attention-softmax-in-fp32 fp16-lm-cross-entropy
        fp32-residual-connection apply-query-key-layer-scaling disable-bf16-reduced-precision-matmul
        output-logit-dtype>logit_dtype use-precision-aware-optimizer main-grads-dtype='fp32'
        main-params-dtype='fp32' exp-avg-dtype='fp32' exp-avg-sq-dtype='fp32'""",
    ),
    (
        "unmapped",
        "a model variant megatronlite does not build",
        None,
        """apply-residual-connection-post-layernorm embedding-init-method-std init-method-xavier-uniform
        data-parallel-random-init qk-l2-norm qk-clip qk-clip-alpha=0.5 qk-clip-threshold=100
        activation-func-clamp-value glu-linear-offset=0.0 no-rope-freq mrope-section
        relative-attention-num-buckets=32 relative-attention-max-distance=128 yarn-* rope-type
        heterogeneous-layers-config-* sgd-momentum=0.9""",
    ),
    (
        "unmapped",
        "a pipeline or data-parallel layout megatronlite does not have (layout only: the math is the same)",
        None,
        """pipeline-model-parallel-layout account-for-embedding-in-pipeline-split account-for-loss-in-pipeline-split
        hierarchical-context-parallel-sizes use-torch-fsdp2 use-megatron-fsdp
        data-parallel-sharding-strategy='no_shard' model-parallel-size num-distributed-optimizer-instances=1
        cpu-offloading-num-layers=0""",
    ),
    (
        "unmapped",
        "a data or tokenizer setting megatronlite does not have",
        None,
        """train-data-path valid-data-path test-data-path data-args-path per-split-data-args-path vocab-extra-ids=0
        tokenizer-special-tokens tokenizer-metadata tiktoken-pattern tiktoken-num-special-tokens=1000
        tiktoken-special-tokens legacy-tokenizer tokenizer-sentencepiece-legacy tokenizer-hf-use-fast
        tokenizer-hf-include-special-tokens trust-remote-code sft padded-vocab-size""",
    ),
    (
        "unmapped",
        "a training-length, loading or saving setting megatronlite does not have",
        None,
        """exit-interval exit-duration-in-mins skip-train full-validation finetune pretrained-checkpoint no-load-optim
        no-load-rng no-save-optim no-save-rng use-checkpoint-args use-mp-args-from-checkpoint-args
        no-use-tokenizer-model-from-checkpoint-args>use_tokenizer_model_from_checkpoint_args non-persistent-*
        save-retain-interval ckpt-step override-ckpt-iteration no-initialization>perform_initialization
        iterations-to-skip test-mode freeze-all-layers load-main-params-from-ckpt""",
    ),
    (
        "unmapped",
        "loss averaged over the tokens of the whole global batch, not per micro-batch",
        None,
        "calculate-per-token-loss",
    ),
]

# args a checkpoint holds that no flag sets: Megatron-LM derives them at start-up
DERIVED = frozenset(
    """rank world_size data_parallel_size params_dtype consumed_train_samples consumed_valid_samples iteration
    virtual_pipeline_model_parallel_size encoder_num_layers encoder_seq_length transformer_pipeline_model_parallel_size
    padded_vocab_size variable_seq_lengths num_floating_point_operations_so_far do_train do_valid do_test curr_iteration
    expert_tensor_and_model_parallel_size pipeline_model_parallel_split_rank""".split()
)


def _literal(text: str) -> Any:
    return None if text == "-" else ast.literal_eval(text)


def _dest(name: str) -> str:
    return name.replace("-", "_")


def _parse_mapped(table: str) -> list[Flag]:
    flags = []
    for line in table.strip().splitlines():
        parts = line.split()
        names, kind = parts[0].split(","), parts[1]
        dest = next((p[1:] for p in parts[2:] if p.startswith(">")), _dest(names[0]))
        defaults = [p for p in parts[2:] if not p.startswith(">")]
        default = _literal(" ".join(defaults)) if defaults else None
        assert kind in KINDS, line
        flags += [Flag(n, dest, kind, default, "mapped") for n in names]
    return flags


def _parse_group(role: str, why: str, when: str | None, names: str) -> list[Flag]:
    flags = []
    for item in names.split():
        spec, _, default = item.partition("=")
        spec, _, dest = spec.partition(">")
        names_ = spec.split(",")
        # a store_false flag (`no-x>x`): its dest is True unless the flag is given
        value = _literal(default) if default else (True if dest and names_[0].startswith("no-") else None)
        flags += [Flag(n, dest or _dest(names_[0]), "any", value, role, why, when) for n in names_]
    return flags


FLAGS: dict[str, Flag] = {f.name: f for f in _parse_mapped(MAPPED)}
PREFIXES: list[Flag] = []
for _role, _why, _when, _names in GROUPS:
    for _flag in _parse_group(_role, _why, _when, _names):
        if _flag.name.endswith("*"):
            PREFIXES.append(_flag)
        else:
            FLAGS.setdefault(_flag.name, _flag)
BY_DEST: dict[str, Flag] = {}
for _flag in FLAGS.values():
    BY_DEST.setdefault(_flag.dest, _flag)


def lookup(name: str) -> Flag | None:
    """The flag `--name`: by its exact name, else by the group whose prefix it has (with its dest as its name's)."""
    if name in FLAGS:
        return FLAGS[name]
    for flag in PREFIXES:
        if name.startswith(flag.name[:-1]):
            return Flag(name, _dest(name), "any", None, flag.role, flag.why, flag.when)
    return None


def lookup_dest(dest: str) -> Flag | None:
    """The flag whose value a checkpoint stores as `args.<dest>`."""
    return BY_DEST.get(dest) or lookup(dest.replace("_", "-"))


@dataclass
class CommandLine:
    """Megatron-LM's arguments: the values given (by dest), how each was written, and the unknown flags."""

    values: dict[str, Any]
    written: dict[str, str]  # dest -> the flag and its value as given, for the report
    unknown: list[str]


NUMBER = re.compile(r"-\d|-\.\d")


def _is_flag(word: str) -> bool:
    """A word starting an option: `--x` (Megatron's flags all have two dashes), not a negative number."""
    return word.startswith("-") and not NUMBER.match(word)


def _convert(flag: Flag, words: list[str], where: str) -> Any:
    """A mapped flag's value from its words, as Megatron-LM's argparse types would make it."""
    shown = f"{where}: --{flag.name}"
    if flag.kind in ("true", "false"):
        if words:
            raise UserError(f"{shown} takes no value, got {' '.join(words)!r}")
        return flag.kind == "true"
    if flag.kind == "list":
        if not words and flag.name == "cp-comm-type":
            raise UserError(f"{shown} expects at least one value")
        return list(words)
    if len(words) != 1:
        got = "nothing" if not words else repr(" ".join(words))
        raise UserError(f"{shown} expects one value, got {got}")
    word = words[0]
    try:
        if flag.kind == "int":
            return int(word)
        if flag.kind == "float":
            return float(word)
        if flag.kind == "tuple":
            return tuple(int(x) for x in word.strip("()").split(","))
    except ValueError:
        expected = {"int": "an integer", "float": "a number", "tuple": "integers such as (4095,0)"}[flag.kind]
        raise UserError(f"{shown}: expected {expected}, got {word!r}") from None
    return word


def parse(argv: list[str], where: str) -> CommandLine:
    """Megatron-LM's command line `argv` by dest, as its argparse reads it (`--flag=value` too; the last one wins)."""
    argv = list(argv)
    values: dict[str, Any] = {}
    written: dict[str, str] = {}
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        j = i + 1
        while j < len(argv) and not _is_flag(argv[j]):
            j += 1
        following = argv[i + 1 : j]
        if word.startswith("--") and re.search(r"\s", word) and "=" not in word:  # a flag and its value as one word
            argv[i : i + 1] = word.split()
            continue
        if not word.startswith("--"):
            unknown.append(" ".join(argv[i:j]) + "  (not a flag)")
            i = j
            continue
        name, eq, inline = word[2:].partition("=")
        words = [inline, *following] if eq else following
        flag = lookup(name)
        shown = " ".join(["--" + name, *words])
        if flag is None:
            unknown.append(shown)
        else:
            values[flag.dest] = _convert(flag, words, where) if flag.role == "mapped" else " ".join(words) or True
            written[flag.dest] = shown
        i = j
    return CommandLine(values, written, unknown)
