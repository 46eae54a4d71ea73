"""`megatronlite config from-megatron`: Megatron-LM training scripts and checkpoints as megatronlite configs.

The scripts are written as Megatron-LM's examples/llama and examples/gpt3 scripts are (variables, flag arrays,
`"${ARR[@]}"`, `if` branches, torchrun); the checkpoints as Megatron-LM's saver writes them (its args
Namespace in each legacy rank file, or in torch_dist's common.pt), holding the args that script's run has.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import error_of

from megatronlite import config
from megatronlite.cli import main
from megatronlite.config import FAMILIES
from megatronlite.convert import megatron_dist, megatron_legacy
from megatronlite.convert.byte_tokenizer import write_hf_files
from megatronlite.from_megatron import flags, from_checkpoint, from_script
from megatronlite.from_megatron.shell import read_script

CLI = [sys.executable, "-m", "megatronlite"]

LLAMA3_8B = r"""#!/bin/bash
# Llama-3 8B pretraining with Megatron-LM on 4 nodes x 8 GPUs (examples/llama style).
# usage: train_llama3_8b.sh CHECKPOINT_DIR TENSORBOARD_DIR TOKENIZER DATA_PREFIX CODE_DATA_PREFIX
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

CHECKPOINT_PATH=${1:-"checkpoints/llama3_8b"}
TENSORBOARD_LOGS_PATH=${2:-"tensorboard_logs/llama3_8b"}
TOKENIZER_MODEL=${3:-"MOCK"}
DATA_PATH=${4:-"MOCK"}
CODE_DATA_PATH=${5:-$DATA_PATH}
mkdir -p "$(dirname "$CHECKPOINT_PATH")"

GPUS_PER_NODE=8
NUM_NODES=4
WORLD_SIZE=$((GPUS_PER_NODE * NUM_NODES))
TP=2; PP=2
CP=2
MICRO_BATCH_SIZE=1
GLOBAL_BATCH_SIZE=128
SEQ_LENGTH=8192
DTYPE="bf16"

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr ${MASTER_ADDR:-localhost}
    --master_port ${MASTER_PORT:-6000}
)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length $SEQ_LENGTH
    --max-position-embeddings $SEQ_LENGTH
    --position-embedding-type rope
    --rotary-base 500000
    --rotary-percent 1.0
    --normalization RMSNorm
    --norm-epsilon 1e-5
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --init-method-std 0.02
    --make-vocab-size-divisible-by 128
    --attention-backend flash  # a kernel choice: no effect on the math
)

TRAINING_ARGS=(
    --micro-batch-size $MICRO_BATCH_SIZE
    --global-batch-size $GLOBAL_BATCH_SIZE
    --train-iters 100000
    --lr 3.0e-4
    --min-lr 3.0e-5
    --lr-decay-style cosine
    --lr-warmup-iters 2000
    --lr-decay-iters 100000
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --adam-eps 1e-8
    --clip-grad 1.0
    --seed 42
    --recompute-granularity full
    --recompute-method block
    --recompute-num-layers 2
    --cross-entropy-loss-fusion
    --manual-gc
)
if [[ "$DTYPE" == "bf16" ]]; then
    TRAINING_ARGS+=(--bf16)
elif [[ "$DTYPE" == "fp8" ]]; then
    TRAINING_ARGS+=(--bf16 "--fp8-format hybrid" "--fp8-amax-history-len 1024")
else
    TRAINING_ARGS+=(--fp16)
fi

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size $TP
    --pipeline-model-parallel-size $PP
    --num-layers-per-virtual-pipeline-stage 4
    --context-parallel-size $CP
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

if [[ "$DATA_PATH" == "MOCK" ]]; then
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 128256)
else
    DATA_ARGS=(
        --data-path 0.7 "$DATA_PATH" 0.3 "$CODE_DATA_PATH"
        --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "$TOKENIZER_MODEL"
        --vocab-size 128256
        --split 99,1,0
        --data-cache-path "${CHECKPOINT_PATH}/cache"
        "--num-workers 2"
    )
fi

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 10
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
    --log-throughput
)

torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    ${MODEL_PARALLEL_ARGS[@]} \
    "${DATA_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}" 2>&1 | tee "logs/llama3_8b_$(date +%s).log"
"""

# GPT-3 style (examples/gpt3): learned positions, LayerNorm, Megatron's default GELU, biases, tied embeddings
GPT2_SMALL = r"""#!/bin/bash
CHECKPOINT_PATH=$1
DATA_PATH=$2

GPT_ARGS="--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 \
          --max-position-embeddings 1024 --attention-dropout 0.0 --hidden-dropout 0.0"
TRAIN_ARGS="--micro-batch-size 8 --global-batch-size 64 --train-iters 20000 --lr 6.0e-4 --min-lr 6.0e-5 \
            --lr-decay-style cosine --lr-warmup-fraction .01 --weight-decay 0.1 --clip-grad 1.0 --fp16"

python pretrain_gpt.py \
    $GPT_ARGS \
    $TRAIN_ARGS \
    --data-path $DATA_PATH \
    --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH --log-interval 100 --save-interval 10000 \
    --eval-interval 1000 --eval-iters 10
"""


def write(tmp_path: Path, text: str, name: str = "train_llama3_8b.sh") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def script_args(tmp_path: Path) -> list[str]:
    """The llama script's $1..$5: checkpoint and tensorboard directories, tokenizer, two data prefixes."""
    return [str(tmp_path / "ckpt"), str(tmp_path / "tb"), str(tmp_path / "tok"), "/data/web", "/data/code"]


def convert_cli(*argv: str) -> None:
    main(["config", "from-megatron", *argv])


# --- a Llama-3 8B script ----------------------------------------------------------------------------


def test_llama3_8b_script_gives_the_llama_8b_model_and_the_scripts_run(tmp_path, capsys):
    script, out = write(tmp_path, LLAMA3_8B), tmp_path / "llama.yaml"
    convert_cli(str(script), *script_args(tmp_path), "-o", str(out))
    cfg = config.load(out)  # validates, as `megatronlite train` loads it
    assert cfg.model == config.load("configs/models/llama-8b.yaml").model  # 32 x 4096, 14336, 32/8 heads, 5e5, 128256
    assert cfg.model.arch == "llama" and not cfg.model.tied and cfg.model.rope_theta == 500000.0
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    assert (p.tensor, p.pipeline, p.virtual_pipeline, p.context) == (2, 2, 4, 2)  # 32 layers / PP 2 / 4 per stage
    assert (p.sequence_parallel, p.distributed_optimizer, p.context_attention) == (True, True, "ring")
    assert (t.micro_batch_size, t.global_batch_size, t.steps, t.seq_len, t.seed) == (1, 128, 100000, 8192, 42)
    assert (t.precision, t.recompute, t.recompute_layers) == ("bf16", "full", 2)
    assert (t.eval_interval, t.eval_iters) == (1000, 10)
    assert (o.lr, o.min_lr, o.schedule, o.warmup_steps) == (3e-4, 3e-5, "cosine", 2000)
    assert (o.weight_decay, o.beta1, o.beta2, o.eps, o.clip_grad) == (0.1, 0.9, 0.95, 1e-8, 1.0)
    assert cfg.data.sources == [{"path": "/data/web", "weight": 0.7}, {"path": "/data/code", "weight": 0.3}]
    assert (cfg.data.split, cfg.data.tokenizer) == ("99,1,0", str(tmp_path / "tok"))
    assert cfg.data.cache_dir == str(tmp_path / "ckpt" / "cache")
    c = cfg.checkpoint
    assert (c.save, c.interval, c.keep, c.load) == (True, 1000, 0, "auto")  # --load == --save: resume
    assert (cfg.logging.interval, cfg.logging.tensorboard) == (10, True)
    config.validate_layout(cfg, 32)  # torchrun's 8 x 4 workers: DP 4

    err = capsys.readouterr().err
    text = out.read_text()
    for ignored in ("--use-mcore-models", "--attention-backend flash", "--overlap-grad-reduce", "--manual-gc"):
        assert f"  {ignored} (" in err and f"#   {ignored} (" in text  # listed, on stderr and in the file
    assert "unmapped" not in err and "unknown" not in err, err  # every other flag maps exactly
    assert "--num-workers 2 (data loading" in err  # a flag and its value written as one array element


def test_checkpoint_args_give_the_same_config_as_the_script(tmp_path):
    script = write(tmp_path, LLAMA3_8B)
    from_the_script = from_script(script, script_args(tmp_path)).raw
    for fmt in ("legacy", "torch_dist"):
        run = tmp_path / fmt
        save_megatron_checkpoint(run / "iter_0001000", megatron_args(tmp_path), fmt)
        (run / "latest_checkpointed_iteration.txt").write_text("1000")
        from_the_checkpoint = from_checkpoint(run)
        assert {**from_the_checkpoint.raw, "name": "-"} == {**from_the_script, "name": "-"}, fmt
        assert from_the_checkpoint.raw["name"] == fmt and from_the_checkpoint.world_size == 32
        assert from_the_checkpoint.report.unknown == ["args.chat_template=chatml"]  # an arg we do not know: listed
        assert not from_the_checkpoint.report.unmapped


def megatron_args(tmp_path: Path) -> argparse.Namespace:
    """The args Megatron-LM's parse_args/validate_args leave for the llama script's run (and save with it)."""
    from megatron.core.transformer.enums import AttnBackend

    ckpt = str(tmp_path / "ckpt")
    return argparse.Namespace(
        # the script's flags
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, group_query_attention=True,
        num_query_groups=8, kv_channels=128, seq_length=8192, max_position_embeddings=8192,
        position_embedding_type="rope", rotary_base=500000, rotary_percent=1.0, normalization="RMSNorm",
        norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02, make_vocab_size_divisible_by=128,
        micro_batch_size=1, global_batch_size=128, train_iters=100000, lr=3e-4, min_lr=3e-5, lr_decay_style="cosine",
        lr_warmup_iters=2000, lr_decay_iters=100000, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=1.0, seed=42, recompute_granularity="full", recompute_method="block", recompute_num_layers=2,
        bf16=True, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
        num_layers_per_virtual_pipeline_stage=4, context_parallel_size=2, sequence_parallel=True,
        use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
        data_path=["0.7", "/data/web", "0.3", "/data/code"], tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(tmp_path / "tok"), vocab_size=128256, split="99,1,0", data_cache_path=ckpt + "/cache",
        num_workers=2, log_interval=10, save_interval=1000, eval_interval=1000, eval_iters=10, save=ckpt, load=ckpt,
        tensorboard_dir=str(tmp_path / "tb"), log_throughput=True, deprecated_use_mcore_models=True,
        attention_backend=AttnBackend.flash, cross_entropy_loss_fusion=True, manual_gc=True,
        # Megatron-LM's defaults for what the script does not say, and what it derives
        openai_gelu=False, squared_relu=False, add_qkv_bias=False, qk_layernorm=False, apply_layernorm_1p=False,
        use_rope_scaling=False, rope_scaling_factor=8.0, rotary_interleaved=False, window_size=None, num_experts=None,
        multi_latent_attention=False, softmax_type="vanilla", add_position_embedding=True, fp16=False,
        train_samples=None, lr_warmup_fraction=None, lr_warmup_samples=0, lr_decay_samples=None, optimizer="adam",
        initial_loss_scale=2**32, loss_scale=None, hysteresis=2, cp_comm_type=["p2p"], mock_data=False,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, wandb_project="", fp8=None,
        fp8_recipe="delayed", moe_router_topk=2, expert_model_parallel_size=1, masked_softmax_fusion=True,
        transformer_impl="transformer_engine", ckpt_format="torch_dist", distributed_backend="nccl",
        rerun_mode="validate_results", chat_template="chatml", padded_vocab_size=128256,
        virtual_pipeline_model_parallel_size=4, world_size=32, rank=0, data_parallel_size=4,
        params_dtype=torch.bfloat16, consumed_train_samples=128000,
    )  # fmt: skip


def save_megatron_checkpoint(directory: Path, args: argparse.Namespace, fmt: str) -> None:
    """What Megatron-LM's save_checkpoint writes around the args (no weights: only the args are read here).
    legacy: one model_optim_rng.pt per (TP, PP) rank; torch_dist: common.pt and metadata.json (and DCP shards)."""
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 1000}
    if fmt == "torch_dist":
        directory.mkdir(parents=True)
        torch.save(state, directory / megatron_dist.COMMON)
        (directory / megatron_dist.METADATA).write_text(json.dumps(megatron_dist.BACKEND))
        return
    rng = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
    for tp in range(2):
        for pp in range(2):
            rank = directory / megatron_legacy.rank_dir(tp, pp, 2)
            rank.mkdir(parents=True)
            torch.save({**state, "model0": {}, "model1": {}, "rng_state": rng}, rank / megatron_legacy.FILE)


def test_an_unknown_flag_is_listed(tmp_path, capsys):
    text = LLAMA3_8B.replace("    --manual-gc\n", "    --manual-gc\n    --frobnicate 3\n")
    out = tmp_path / "out.yaml"
    convert_cli(str(write(tmp_path, text)), *script_args(tmp_path), "-o", str(out))
    err = capsys.readouterr().err
    assert "unknown (not a Megatron-LM flag megatronlite knows):\n  --frobnicate 3\n" in err
    assert "#   --frobnicate 3\n" in out.read_text()
    config.load(out)


def test_flags_that_change_the_run_are_listed_as_unmapped(tmp_path):
    extra = "    --num-experts 8\n    --moe-input-jitter-eps 0.01\n    --rotary-percent 0.5\n    --decoupled-lr 5e-4\n"
    text = LLAMA3_8B.replace("    --manual-gc\n", "    --manual-gc\n" + extra).replace('DTYPE="bf16"', 'DTYPE="fp8"')
    report = from_script(write(tmp_path, text), script_args(tmp_path)).report
    unmapped = "\n".join(report.unmapped)
    for flag in ("--moe-input-jitter-eps 0.01", "--rotary-percent 0.5", "--decoupled-lr 5e-4"):
        assert flag in unmapped, unmapped
    assert "--fp8-format hybrid: FP8" in unmapped and "--fp8-amax-history-len 1024" in unmapped  # the fp8 branch ran


MIXTRAL = """    --num-experts 8
    --moe-router-topk 2
    --moe-ffn-hidden-size 14336
    --moe-aux-loss-coeff 1e-2
    --moe-z-loss-coeff 1e-3
    --moe-router-load-balancing-type global_aux_loss
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall
    --expert-model-parallel-size 8
"""
DEEPSEEK = """    --num-experts 8
    --moe-router-topk 4
    --moe-router-score-function sigmoid
    --moe-router-enable-expert-bias
    --moe-router-bias-update-rate 1e-3
    --moe-router-topk-scaling-factor 2.5
    --moe-router-load-balancing-type seq_aux_loss
    --moe-aux-loss-coeff 1e-4
    --moe-shared-expert-intermediate-size 2048
    --moe-layer-freq ([0]*1+[1]*31)
    --moe-expert-capacity-factor 1.25
"""


@pytest.mark.parametrize("moe", [MIXTRAL, DEEPSEEK], ids=["mixtral", "deepseek"])
def test_moe_flags_map_onto_model_moe(tmp_path, moe):
    text = LLAMA3_8B.replace("    --manual-gc\n", "    --manual-gc\n" + moe)
    conversion = from_script(write(tmp_path, text), script_args(tmp_path))
    cfg = config.from_dict(conversion.raw)
    e = cfg.model.moe
    if moe is MIXTRAL:
        assert (e.num_experts, e.top_k, e.ffn_hidden_size, e.router) == (8, 2, 14336, "softmax")
        assert e.normalize_top_k  # Megatron's softmax over the top k's logits
        assert (e.aux_loss_coeff, e.z_loss_coeff, e.layer_freq, cfg.parallel.expert) == (1e-2, 1e-3, 1, 8)
        assert e.aux_loss_scope == "global"
        assert "--moe-token-dispatcher-type alltoall" in "\n".join(conversion.report.ignored)
        assert not conversion.report.approximated
    else:
        assert (e.router, e.normalize_top_k, e.scaling_factor, e.bias_update_rate) == ("sigmoid", True, 2.5, 1e-3)
        assert e.layer_freq == [0] + [1] * 31 and e.shared_expert_ffn_hidden_size == 2048 and e.capacity_factor == 1.25
        approximated = "\n".join(conversion.report.approximated)
        assert "--moe-router-load-balancing-type seq_aux_loss" in approximated
        assert "--moe-expert-capacity-factor 1.25" in approximated
    assert not conversion.report.unmapped and not conversion.report.unknown


def test_a_layer_pattern_is_read_without_running_it(tmp_path):
    huge = "    --num-experts 8\n    --moe-layer-freq [0]*99999999999\n"  # refused before any list is built
    text = LLAMA3_8B.replace("    --manual-gc\n", "    --manual-gc\n" + huge)
    with pytest.raises(config.UserError, match="--moe-layer-freq"):
        from_script(write(tmp_path, text), script_args(tmp_path))


# --- a GPT-2 style script ---------------------------------------------------------------------------


def test_gpt2_style_script_maps_to_the_gpt2_features(tmp_path):
    out = tmp_path / "gpt2.yaml"
    convert_cli(str(write(tmp_path, GPT2_SMALL, "gpt2.sh")), str(tmp_path / "ckpt"), "/data/owt", "-o", str(out))
    cfg = config.load(out)
    m = cfg.model
    assert m.arch == "gpt2" and all(getattr(m, k) == v for k, v in FAMILIES["gpt2"].items())
    features = (m.norm, m.activation, m.position, m.bias, m.qkv_bias, m.tied)
    assert features == ("layernorm", "gelu", "learned", True, True, True)
    shape = (m.num_layers, m.hidden_size, m.num_heads, m.kv_heads, m.ffn_hidden_size, m.vocab_size)
    assert shape == (12, 768, 12, 12, 3072, 50257)  # ffn: Megatron's 4h; vocab: GPT-2's
    assert (cfg.train.precision, cfg.optim.warmup_steps, cfg.data.split) == ("fp16", 200, "969,30,1")  # .01 x 20000
    assert cfg.optim.initial_loss_scale == 2.0**32  # Megatron's default
    text = out.read_text()
    assert "exact (erf) one" in text  # Megatron's default GELU; ours is the tanh approximation
    assert "--tokenizer-type GPT2BPETokenizer: GPT-2's vocab.json and merges.txt" in text


# --- shell and flag reading -------------------------------------------------------------------------


def test_shell_reading(tmp_path):
    """Variables, defaults, arithmetic, arrays (appended, quoted, unquoted), branches, continuations, comments."""
    script = r"""
export A=1 B="two words"
N=${N:-3}; M=$((N * 4 + A))
ARGS=(--a $A   # a comment inside an array
      "--b $B")
ARGS+=("--c=$M" '--d $literal')
if [ "$B" = "two words" ] && [[ $N -ge 3 ]]; then
  ARGS+=(--branch taken)
elif true; then
  ARGS+=(--branch wrong)
else
  ARGS+=(--branch else)
fi
EMPTY=()
shift
CUDA_VISIBLE_DEVICES=0 python -u \
  /opt/megatron/pretrain_gpt.py "${ARGS[@]}" "${EMPTY[@]}" --e "$1" --f $UNSET > log.txt
echo done
"""
    found = read_script(write(tmp_path, script, "s.sh"), ["dropped", "first"])
    assert found.program == "pretrain_gpt.py" and found.launcher == ["python", "-u"] and found.line == 16
    assert found.argv == [
        "--a", "1", "--b two words", "--c=13", "--d $literal", "--branch", "taken", "--e", "first", "--f", "$UNSET",
    ]  # fmt: skip
    assert found.world_size is None
    assert any("$UNSET" in note for note in found.notes)


def test_flag_values_and_mappings(tmp_path):
    line = flags.parse(["--lr=1e-4", "--data-path", "0.5", "a", "0.5", "b", "--min-lr", "-1", "--x"], "s.sh")
    assert line.values == {"lr": 1e-4, "data_path": ["0.5", "a", "0.5", "b"], "min_lr": -1.0}
    assert line.unknown == ["--x"]
    base = LLAMA3_8B.replace("    --lr-warmup-iters 2000\n    --lr-decay-iters 100000\n", "")
    cases = {  # flags replaced -> the keys they give
        ("--train-iters 100000", "--train-samples 12800000 --lr-warmup-samples 256000"):
            dict(steps=100000, warmup_steps=2000),
        ("--lr-decay-style cosine", "--lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters 20000"):
            dict(schedule="wsd", decay_fraction=0.2),
        ("--tensor-model-parallel-size $TP", "--tensor-model-parallel-size 1"): dict(sequence_parallel=False),
        ("--num-layers-per-virtual-pipeline-stage 4", "--decoder-first-pipeline-num-layers 14"):
            dict(pipeline_layers=[14, 18]),
        ("--context-parallel-size $CP", "--context-parallel-size $CP --cp-comm-type all_gather"):
            dict(context_attention="allgather"),
        ("--sequence-parallel", "--reset-position-ids --reset-attention-mask --eod-mask-loss"):
            dict(document_mask=True, eod_mask_loss=True),
        ("--rotary-base 500000", "--rotary-base 500000 --use-rope-scaling --rope-scaling-factor 32"):
            dict(rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}),
        ('DTYPE="bf16"', 'DTYPE="fp16"'): dict(precision="fp16", initial_loss_scale=2.0**32),
    }  # fmt: skip
    for (old, new), expected in cases.items():
        assert old in base, old
        raw = from_script(write(tmp_path, base.replace(old, new)), script_args(tmp_path)).raw
        sections = {k: v for section in raw.values() if isinstance(section, dict) for k, v in section.items()}
        assert {k: sections.get(k) for k in expected} == expected, new


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("python train.py --lr 1\n", "no pretrain_*.py command found"),
        ("python pretrain_gpt.py --num-layers abc\n", "--num-layers: expected an integer, got 'abc'"),
        ("python pretrain_gpt.py --lr\n", "--lr expects one value, got nothing"),
        ("python pretrain_gpt.py --swiglu yes\n", "--swiglu takes no value, got 'yes'"),
        ("python pretrain_gpt.py --num-layers 2\n", "--hidden-size, --num-attention-heads, --seq-length"),
        ("python pretrain_bert.py --num-layers 2\n", "runs pretrain_bert.py; megatronlite trains GPT models"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_flag(tmp_path, capsys, text, message):
    script = write(tmp_path, text, "bad.sh")
    line = error_of(capsys, "config", "from-megatron", str(script))
    assert line.startswith(f"megatronlite: error: {script}") and message in line, line


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-script.sh"
    done = subprocess.run([*CLI, "config", "from-megatron", str(missing)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megatronlite: error: {missing}: no such file or directory"), lines
    line = error_of(capsys, "config", "from-megatron", str(tmp_path), "x")
    assert line.endswith("a checkpoint takes no script arguments (got x)")


# --- the config runs ----------------------------------------------------------------------------------


def test_the_config_passes_a_dry_run(tmp_path, corpus, short_docs):
    help_text = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, timeout=120).stdout
    if "--dry-run" not in help_text:
        pytest.skip("megatronlite train has no --dry-run yet")
    (tmp_path / "tok").mkdir()
    write_hf_files(tmp_path / "tok", 8192)  # the byte tokenizer as a tokenizer.json: the corpora are byte tokens
    args = [str(tmp_path / "ckpt"), str(tmp_path / "tb"), str(tmp_path / "tok"), corpus, short_docs]
    out = tmp_path / "llama.yaml"
    convert_cli(str(write(tmp_path, LLAMA3_8B)), *args, "-o", str(out))
    cfg = config.load(out)
    assert [s["path"] for s in cfg.data.sources] == [corpus, short_docs]
    few_steps = ["--set", "train.steps=2", "--set", "train.eval_iters=1"]  # the sample index of 100000 steps: slow
    done = subprocess.run(
        [*CLI, "train", str(out), "--dry-run", "--workers", "32", "--run-dir", str(tmp_path / "run"), *few_steps],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "every check passed" in done.stdout
