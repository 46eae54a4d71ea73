"""Megatron-LM / megatron-core checkpoints, validated against megatron-core's own code on CPU.

megatron-core builds its GPTModel (local, non-TE layers) and runs it on CPU under gloo once a few
CUDA-only calls are redirected (see `_cpu_shims`). Its `dist_checkpointing` then writes real
torch_dist checkpoints, its models' state dicts make real legacy rank files (as Megatron-LM's
saver does), and it loads what we write, at TP 1, TP 2 and PP 2, and its MoE models (SequentialMLP experts,
allgather dispatcher) at EP 2 as well. GroupedMLP (--moe-grouped-gemm) is built too, its grouped_gemm check
shimmed: it cannot run without the grouped_gemm package and CUDA, but it loads megatron-core's own checkpoint
and saves its forms (weight1/weight2 rank files, torch_dist), which we read. What runs only with CUDA and
Transformer Engine (TE layers, their FP8 extra state, TEGroupedMLP) is not exercised here.

`_worker` is the megatron-core side, run in the workers of a job (tests/helpers.py `workers`).
"""

import argparse
import dataclasses
import datetime
import json
import re
import types
import zlib
from pathlib import Path

import pytest
import torch
from helpers import conversion_model, workers

from megatronlite import load_model
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint
from megatronlite.config import ModelConfig, MoEConfig
from megatronlite.convert import Options, convert, read
from megatronlite.convert.dcp_store import stored_tensors
from megatronlite.convert.megatron_legacy import rank_dir
from megatronlite.convert.model_state import run_config
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel

VOCAB, LAYERS = 200, 4
_LLAMA_ARGS = dict(
    hidden_size=48,
    num_attention_heads=6,
    num_query_groups=2,
    ffn_hidden_size=80,
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
)
ARCHS = {  # Megatron-LM args (shape and features) of each megatron-core model; unnamed args: Megatron's defaults
    "llama": _LLAMA_ARGS,
    "gpt2": dict(
        hidden_size=48,
        num_attention_heads=4,
        num_query_groups=4,
        ffn_hidden_size=192,
        normalization="LayerNorm",
        openai_gelu=True,
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
    ),
    "qwen2": {**_LLAMA_ARGS, "add_qkv_bias": True, "rotary_base": 1000000, "norm_epsilon": 1e-6},
    "qwen3": {**_LLAMA_ARGS, "num_attention_heads": 4, "kv_channels": 16, "qk_layernorm": True},
    "llama3": {**_LLAMA_ARGS, "use_rope_scaling": True, "rope_scaling_factor": 8.0, "rotary_base": 500000},
    "mistral": {**_LLAMA_ARGS, "window_size": (3, 0)},
    # softmax top-2, renormalised; a dense layer first (per-layer torch_dist keys)
    "mixtral": {
        **_LLAMA_ARGS,
        "num_experts": 4,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 24,
        "moe_layer_freq": [0, 1, 1, 1],
    },
    # every layer MoE (stacked keys): sigmoid router, scaled, with an expert bias; a gated shared expert
    "moe_shared": {
        **_LLAMA_ARGS,
        "num_experts": 4,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 16,
        "moe_shared_expert_intermediate_size": 32,
        "moe_shared_expert_gate": True,
        "moe_router_score_function": "sigmoid",
        "moe_router_topk_scaling_factor": 2.5,
        "moe_router_enable_expert_bias": True,
    },
}
MOE_ARCHS = ("mixtral", "moe_shared")
PIPELINE_ARCHS = ("llama", "gpt2", "qwen3", "mixtral")  # pp2 is about placement: fewer models keep it fast
MATTERS = {  # at these sizes, without it the logits differ
    "llama3": lambda m: dataclasses.replace(m, rope_scaling=None),
    "mistral": lambda m: dataclasses.replace(m, sliding_window=None),
    "mixtral": lambda m: dataclasses.replace(m, moe=dataclasses.replace(m.moe, normalize_top_k=False)),
    "moe_shared": lambda m: dataclasses.replace(m, moe=dataclasses.replace(m.moe, scaling_factor=1.0)),
}


# --- without megatron-core: our writer and reader agree, and bad input is named ------------------


def native(tmp_path, model: ModelConfig):
    cfg = run_config(model, "src")
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) for n, s in expected_shapes(cfg).items()}
    write_checkpoint(tmp_path / "src", cfg, tensors.items())
    return tmp_path / "src", tensors


LLAMA = conversion_model("llama", num_layers=4)
GPT2 = conversion_model("gpt2", num_layers=4, num_heads=2, num_kv_heads=2)
LLAMA3_SCALING = dict(
    type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
MODELS = {  # every feature Megatron expresses, each model's arch the family a reader names it by
    "llama": LLAMA,
    "gpt2": GPT2,
    "qwen2": dataclasses.replace(LLAMA, arch="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dataclasses.replace(LLAMA, arch="qwen3", qk_norm=True, head_dim=12, rope_theta=1e6, norm_eps=1e-6),
    "llama3": dataclasses.replace(LLAMA, rope_scaling=LLAMA3_SCALING, rope_theta=5e5, tie_embeddings=True),
    "mistral": dataclasses.replace(LLAMA, arch="mistral", rope_theta=1e6, sliding_window=4),
    "gpt2_swiglu": dataclasses.replace(GPT2, activation="swiglu"),  # biases on a gated fc1
    "mixtral": dataclasses.replace(LLAMA, moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16)),
    "moe_shared": dataclasses.replace(
        LLAMA,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            ffn_hidden_size=16,
            layer_freq=[0, 1, 1, 1],
            shared_expert_ffn_hidden_size=24,
            shared_expert_gate=True,
            router="sigmoid",
            scaling_factor=2.5,
            aux_loss_coeff=0.01,
            aux_loss_scope="global",  # Megatron's global_aux_loss
            z_loss_coeff=0.001,
            bias_update_rate=0.001,
        ),
    ),
    "moe_gelu": dataclasses.replace(  # top-1 pre-softmax, every other layer
        GPT2,
        bias=False,
        qkv_bias=False,
        moe=MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=16, layer_freq=2, normalize_top_k=False),
    ),
}


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize(
    "layout", [("torch", 1, 1, "te"), ("torch", 2, 2, "local"), ("torch", 2, 4, "te"), ("torch_dist", 2, 1, "te")]
)
def test_layouts_round_trip(tmp_path, model, layout):
    fmt, tp, pp, spec = layout
    src, tensors = native(tmp_path, model)
    options = Options(megatron_format=fmt, megatron_tp=tp, megatron_pp=pp, megatron_spec=spec)
    convert("mlite", "megatron", src, tmp_path / "meg", options)
    ranks = sorted(p.name for p in (tmp_path / "meg" / "release").iterdir() if p.name.startswith("mp_rank"))
    assert len(ranks) == (tp * pp if fmt == "torch" else 0)
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    back = read("megatron", tmp_path / "meg", Options())
    assert back.cfg.model == model
    assert all(torch.equal(back.get(n), t) for n, t in tensors.items())


def test_legacy_virtual_pipeline_stages(tmp_path):
    """With virtual stages each rank file holds model0, model1, ...: chunk v of rank p has the layers of
    stage v x PP + p. Built here from a 4-stage checkpoint regrouped as 2 ranks x 2 virtual stages."""
    src, tensors = native(tmp_path, LLAMA)
    convert("mlite", "megatron", src, tmp_path / "pp4", Options(megatron_format="torch", megatron_pp=4))
    stages = [
        torch.load(tmp_path / f"pp4/release/mp_rank_00_{s:03d}/model_optim_rng.pt", weights_only=False)
        for s in range(4)
    ]
    args = stages[0]["args"]
    args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size = 2, 2
    for p in range(2):
        (tmp_path / f"vpp/iter_0000001/mp_rank_00_{p:03d}").mkdir(parents=True)
        state = {"args": args, "model0": stages[p]["model"], "model1": stages[2 + p]["model"]}
        torch.save(state, tmp_path / f"vpp/iter_0000001/mp_rank_00_{p:03d}/model_optim_rng.pt")
    back = read("megatron", tmp_path / "vpp", Options())
    assert all(torch.equal(back.get(n), t) for n, t in tensors.items())


def test_vocab_padding_is_removed_and_added(tmp_path):
    src, tensors = native(tmp_path, LLAMA)
    convert("mlite", "megatron", src, tmp_path / "meg", Options(megatron_tp=2))
    back = read("megatron", tmp_path / "meg", Options())
    assert back.cfg.model.vocab_size == 77  # args.vocab_size, which we record
    assert torch.equal(back.get("embedding.word.weight"), tensors["embedding.word.weight"])
    shapes = stored_tensors(tmp_path / "meg" / "release")
    assert shapes["embedding.word_embeddings.weight"][0] == (256, 32)  # 77 padded to a multiple of 128 x TP 2
    assert shapes["decoder.layers.mlp.linear_fc1.weight"][0] == (4, 96, 32)  # layers stacked, [gate; up]


def _legacy_args(tmp_path, model: ModelConfig = LLAMA, **changes) -> Path:
    src, _ = native(tmp_path, model)
    convert("mlite", "megatron", src, tmp_path / "meg", Options(megatron_format="torch"))
    path = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    vars(state["args"]).update(changes)
    torch.save(state, path)
    return tmp_path / "meg"


@pytest.mark.parametrize(
    "arg,value",
    [
        ("multi_latent_attention", True),
        ("position_embedding_type", "yarn"),  # megatron-core's GPTModel drops yarn's attention factor
        ("position_embedding_type", "none"),
        ("normalization", "LayerNorm1P"),
        ("swiglu", False),  # with openai_gelu off: erf GELU
        ("squared_relu", True),
        ("rotary_percent", 0.5),
        ("rotary_interleaved", True),
        ("rotary_seq_len_interpolation_factor", 2.0),
        ("apply_layernorm_1p", True),
        ("window_size", (3, 3)),
        ("window_attn_skip_freq", 2),
        ("softmax_type", "off-by-one"),
        # no trace in the tensors: megatron-core's logits differ from a model read without them (rel. 0.15-1.35)
        ("no_rope_freq", [0, 1]),
        ("qk_l2_norm", True),
        ("glu_linear_offset", 1.0),
        ("activation_func_clamp_value", 0.5),
        ("apply_residual_connection_post_layernorm", True),
    ],
)
def test_unsupported_megatron_args_are_refused(tmp_path, arg, value):
    meg = _legacy_args(tmp_path, **{arg: value})
    with pytest.raises(UserError, match=rf"release: args\.{arg}=.* is not supported; megatronlite converts dense"):
        read("megatron", meg, Options())


@pytest.mark.parametrize(
    "arg,value",
    [
        ("moe_router_num_groups", 2),
        ("moe_expert_capacity_factor", 1.25),
        ("moe_input_jitter_eps", 0.01),
        ("moe_apply_probs_on_input", True),
        ("moe_router_load_balancing_type", "sinkhorn"),
        ("add_bias_linear", True),
    ],
)
def test_unsupported_megatron_moe_args_are_refused(tmp_path, arg, value):
    meg = _legacy_args(tmp_path, MODELS["mixtral"], **{arg: value})
    with pytest.raises(
        UserError, match=rf"release: args\.{arg}.* is not supported; megatronlite converts megatron-core MoE"
    ):
        read("megatron", meg, Options())


def test_nonzero_expert_bias_is_refused(tmp_path):
    """megatronlite's selection biases are training state, not weights: a model read from weights routes without."""
    meg = _legacy_args(tmp_path, MODELS["moe_shared"])
    path = meg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    assert torch.equal(state["model"]["decoder.layers.2.mlp.router.expert_bias"], torch.zeros(4))  # written as zeros
    state["model"]["decoder.layers.2.mlp.router.expert_bias"][1] = 0.5
    torch.save(state, path)
    with pytest.raises(UserError, match=r"decoder\.layers\.2\.mlp\.router\.expert_bias holds nonzero selection"):
        read("megatron", meg, Options())


@pytest.mark.parametrize("fmt,tp,pp,ep", [("torch", 2, 2, 2), ("torch", 1, 1, 4), ("torch_dist", 1, 1, 2)])
def test_expert_parallel_round_trip(tmp_path, fmt, tp, pp, ep):
    """Legacy files per EP rank (`mp_rank_TT_PPP_EEE`) hold their experts by local index; torch_dist the global ones."""
    model = MODELS["moe_shared"]
    src, tensors = native(tmp_path, model)
    options = Options(megatron_format=fmt, megatron_tp=tp, megatron_pp=pp, megatron_ep=ep)
    convert("mlite", "megatron", src, tmp_path / "meg", options)
    back = read("megatron", tmp_path / "meg", Options())
    assert back.cfg.model == model
    assert all(torch.equal(back.get(n), t) for n, t in tensors.items())
    if fmt == "torch":
        ranks = sorted(p.name for p in (tmp_path / "meg" / "release").iterdir())
        assert len(ranks) == tp * pp * ep and ranks[-1] == rank_dir(tp - 1, pp - 1, pp, ep - 1, ep)
        last = torch.load(tmp_path / "meg" / "release" / ranks[-1] / "model_optim_rng.pt", weights_only=False)
        local = {int(m[1]) for k in last["model"] if (m := re.search(r"\.local_experts\.(\d+)\.", k))}
        assert local == set(range(4 // ep))  # its own experts, numbered from 0
        assert last["args"].expert_model_parallel_size == ep


def test_te_grouped_expert_names_are_read(tmp_path):
    """TEGroupedMLP's rank files name expert j's tensors `mlp.experts.linear_fc1.weightJ` (built here from
    SequentialMLP's `mlp.experts.local_experts.J.linear_fc1.weight`: TE's GroupedLinear holds the same tensor)."""
    src, tensors = native(tmp_path, MODELS["mixtral"])
    convert("mlite", "megatron", src, tmp_path / "meg", Options(megatron_format="torch", megatron_tp=2, megatron_ep=2))
    for path in (tmp_path / "meg" / "release").glob("*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        model = {}
        for k, v in state["model"].items():
            k = re.sub(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", r"experts.\2.weight\1", k)
            model[
                re.sub(r"experts\.local_experts\.\d+\.(linear_fc[12])\._extra_state", r"experts.\1._extra_state", k)
            ] = v
        assert any(k.endswith("mlp.experts.linear_fc1.weight1") for k in model)
        torch.save({**state, "model": model}, path)
    back = read("megatron", tmp_path / "meg", Options())
    assert all(torch.equal(back.get(n), t) for n, t in tensors.items())


def test_qk_layernorm_must_be_rmsnorm(tmp_path):
    meg = _legacy_args(tmp_path, qk_layernorm=True, normalization="LayerNorm")
    with pytest.raises(UserError, match="args.qk_layernorm with args.normalization='LayerNorm' is not supported"):
        read("megatron", meg, Options())


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(rope_scaling=YARN), "model.rope_scaling.type='yarn' cannot be written"),
        (dict(rope_scaling={**LLAMA3_SCALING, "high_freq_factor": 2.0}), "model.rope_scaling.high_freq_factor=2.0"),
        (dict(rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 4096}), "original_max_position"),
        (dict(bias=True, qkv_bias=False), "model.bias without model.qkv_bias cannot be written"),
        (dict(qk_norm=True, norm="layernorm"), "model.qk_norm with model.norm='layernorm' cannot be written"),
        (dict(moe=MoEConfig(4, capacity_factor=1.25)), "model.moe.capacity_factor=1.25 cannot be written"),
        (dict(moe=MoEConfig(4, router="sigmoid", normalize_top_k=False)), "model.moe.normalize_top_k=False cannot"),
        (dict(moe=MoEConfig(4, top_k=1)), "model.moe.normalize_top_k=True cannot be written"),
        (dict(moe=MoEConfig(4, bias_update_rate=1e-3)), "model.moe.bias_update_rate=0.001 cannot be written"),
        (dict(bias=True, qkv_bias=True, moe=MoEConfig(4)), "model.bias with model.moe cannot be written"),
    ],
)
def test_features_megatron_cannot_express_are_refused(tmp_path, changes, message):
    src, _ = native(tmp_path, dataclasses.replace(LLAMA, **changes))
    with pytest.raises(UserError, match=message):
        convert("mlite", "megatron", src, tmp_path / "meg", Options())
    assert not (tmp_path / "meg").exists()


def test_moe_run_state_is_not_carried(tmp_path):
    from megatronlite.convert import megatron
    from megatronlite.convert.model_state import TrainingState

    src, _ = native(tmp_path, MODELS["mixtral"])
    ckpt = read("mlite", src, Options())
    ckpt.training = TrainingState({"exp_avg": ckpt.get, "exp_avg_sq": ckpt.get}, step=5, optimizer_steps=5)
    with pytest.raises(UserError, match="carrying an MoE run's optimizer state .* pass --weights-only"):
        megatron.write(ckpt, tmp_path / "meg", Options())


def test_missing_rank_file_is_named(tmp_path):
    meg = _legacy_args(tmp_path, tensor_model_parallel_size=2)
    with pytest.raises(UserError, match="mp_rank_01/model_optim_rng.pt: file not found"):
        read("megatron", meg, Options())


def test_real_vocab_size_comes_from_the_option(tmp_path):
    meg = _legacy_args(tmp_path, vocab_size=None)
    assert read("megatron", meg, Options()).cfg.model.vocab_size == 128  # all padded rows kept
    assert read("megatron", meg, Options(vocab_size=77)).cfg.model.vocab_size == 77


# --- against megatron-core ----------------------------------------------------------------------


def _run_workers(scenario: str, nproc: int, out: Path) -> dict:
    pytest.importorskip("megatron.core")
    workers(_worker, nproc, scenario, str(out))
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("scenario,nproc", [("tp1", 1), ("tp2", 2), ("pp2", 2)])
def test_against_megatron_core(tmp_path, scenario, nproc):
    """tp2 also runs the MoE models at EP 2 (TP 1, DP 2), in the same processes."""
    results = _run_workers(scenario, nproc, tmp_path)
    assert set(results) == {arch for *_, archs in _passes(scenario) for arch in archs}
    for arch, r in results.items():
        # reading megatron-core's torch_dist and legacy files gives the same tensors
        assert r["dist_equals_legacy"]
        if scenario != "pp2":  # our model of the converted weights computes megatron-core's logits
            ids, reference = torch.load(tmp_path / arch / "reference.pt").values()
            model = load_model(tmp_path / arch / "ml")
            assert _logits_diff(model, ids, reference) < 1e-4
            base = arch.split("@")[0]
            if base in MATTERS:  # and the feature is tested: without it they differ
                without = GPTModel(MATTERS[base](model.cfg))
                without.load_state_dict(model.state_dict())
                assert _logits_diff(without, ids, reference) > 1e-3
        if arch.split("@")[0] in MOE_ARCHS and scenario != "pp2":
            # GroupedMLP's rank files (weight1/weight2) and torch_dist read as SequentialMLP's
            assert r["grouped_legacy_equal"] and r["grouped_dist_equal"]
        # megatron-core loads what we write (strictly), and gets its own weights back
        assert r["our_legacy_param_diff"] == 0.0
        assert r["our_dist_param_diff"] == 0.0
        if scenario == "tp1":
            assert r["te_names_match"]


@torch.no_grad()
def _logits_diff(model: GPTModel, ids: torch.Tensor, reference: torch.Tensor) -> float:
    return (model(ids) - reference).abs().max().item()


def _cpu_shims() -> None:
    """megatron-core asks CUDA for things CPU runs do not need: the current device, a sync, a CUDA RNG
    fork around (here zero) attention dropout, moving a tied embedding to the GPU before syncing it
    between pipeline stages, the device of the sliding-window and default causal masks; and psutil for
    memory logging while saving.
    For MoE: the router's TE GEMM name, undefined without TE; GroupedMLP's check for the grouped_gemm package."""
    import contextlib

    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # megatron-core's router uses it unset when Transformer Engine is absent
    try:
        from megatron.core.transformer.moe import grouped_gemm_util
    except ImportError:  # megatron-core >= 0.17 has no GroupedMLP (TEGroupedMLP only)
        pass
    else:
        grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None  # GroupedMLP is built and saved, never run
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    filesystem_async._process_memory = lambda: 0
    # megatron-core's own sliding-window mask code, run with a `torch` whose `ones` ignores device="cuda"
    window_mask = fused_softmax.get_sliding_window_causal_mask
    cpu_torch = types.SimpleNamespace(
        ones=lambda *a, device=None, **k: torch.ones(*a, **k), triu=torch.triu, tril=torch.tril, bool=torch.bool
    )
    fused_softmax.get_sliding_window_causal_mask = types.FunctionType(
        window_mask.__code__, {**window_mask.__globals__, "torch": cpu_torch}
    )
    # and the causal mask it makes when given none (made on "cuda")
    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


MOE_CONFIG = {  # TransformerConfig's MoE fields: Megatron-LM's args of the same names (num_experts aside)
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": None,
    "moe_layer_freq": 1,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_router_enable_expert_bias": False,
}


def _mcore_model(arch: str, seed: int, vocab: int = VOCAB, grouped: bool = False):
    """megatron-core's GPTModel of `ARCHS[arch]` with a `vocab`-token vocabulary (padded as Megatron-LM pads it),
    built from those args as Megatron-LM does, and the full args. MoE models: the decoder block spec of local
    layers (SequentialMLP experts; GroupedMLP with `grouped`), the allgather dispatcher, EP as initialized."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = ARCHS[arch]
    gated, tied = a.get("swiglu", False), not a.get("untie_embeddings_and_output_weights", False)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    experts = a.get("num_experts")
    moe = {k: a.get(k, default) for k, default in MOE_CONFIG.items()} if experts else {}
    if experts:
        moe.update(num_moe_experts=experts, moe_grouped_gemm=grouped, expert_model_parallel_size=ep)
    cfg = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=a["hidden_size"],
        num_attention_heads=a["num_attention_heads"],
        num_query_groups=a["num_query_groups"],
        ffn_hidden_size=a["ffn_hidden_size"],
        kv_channels=a.get("kv_channels"),
        normalization=a["normalization"],
        gated_linear_unit=gated,
        add_bias_linear=a["add_bias_linear"],
        add_qkv_bias=a.get("add_qkv_bias", False),
        qk_layernorm=a.get("qk_layernorm", False),
        window_size=a.get("window_size"),
        layernorm_epsilon=a.get("norm_epsilon", 1e-5),
        activation_func=F.silu if gated else (lambda x: F.gelu(x, approximate="tanh")),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        **moe,
    )
    padded = 128 * tp * -(-vocab // (128 * tp))
    if experts:
        spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=cfg.normalization)
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm)
    model = GPTModel(
        cfg,
        spec,
        vocab_size=padded,
        max_sequence_length=64,
        position_embedding_type=a["position_embedding_type"],
        rotary_base=a.get("rotary_base", 10000),
        rope_scaling=a.get("use_rope_scaling", False),
        rope_scaling_factor=a.get("rope_scaling_factor", 8.0),
        share_embeddings_and_output_weights=tied,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=False,
    )
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # distinct values per TP shard and stage, the same on TP replicas; a tied output layer equals the embedding
            tied_copy = name == "output_layer.weight" and tied
            source, stage = ("embedding.word_embeddings.weight", 0) if tied_copy else (name, pp_rank)
            local = re.search(r"local_experts\.(\d+)\.", source)  # by its global index (its EP rank's first + j)
            if local:
                first = ep_rank * experts // ep
                source = source.replace(local[0], f"local_experts.{first + int(local[1])}.")
            shard = tp_rank if getattr(p, "tensor_model_parallel", False) else -1
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{source}|{shard}|{stage}".encode()))
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if "word_embeddings" in source or "output_layer" in source:  # zero the padding rows
                first = tp_rank * (padded // tp)
                p[max(0, vocab - first) :] = 0
    args = argparse.Namespace(
        **{**a, "kv_channels": cfg.kv_channels},  # Megatron-LM fills it in, as megatron-core does
        num_layers=LAYERS,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        max_position_embeddings=64,
        seq_length=32,
        padded_vocab_size=padded,
        vocab_size=None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=ep,
        moe_grouped_gemm=grouped,
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto,  # a Megatron enum, as real args hold
    )
    return model, args


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    s = ids.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    return model(ids, torch.arange(s)[None].expand_as(ids), attention_mask=mask)


def _param_diff(model, state: dict) -> float:
    """Largest difference between a model's parameters and those of another."""
    params = dict(model.named_parameters())
    return max((params[k] - state[k]).abs().max().item() for k in params)


def _save_legacy(model, args, directory: Path) -> None:
    """What Megatron-LM's save_checkpoint writes in the legacy format (args, model, numpy RNG state...)."""
    import numpy as np

    name = _rank_dir(args.pipeline_model_parallel_size, args.expert_model_parallel_size)
    (directory / name).mkdir(parents=True, exist_ok=True)
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 3,
        "model": model.state_dict_for_save_checkpoint(),
        "rng_state": [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}],
    }
    torch.save(state, directory / name / "model_optim_rng.pt")


def _rank_dir(pp: int, ep: int) -> str:
    """This rank's legacy directory, as Megatron-LM names it: mp_rank_TT[_PPP][_EEE]."""
    from megatron.core import parallel_state as ps

    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    name += f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else ""
    return name + (f"_{ps.get_expert_model_parallel_rank():03d}" if ep > 1 else "")


def _grouped_forms(arch: str, out: Path) -> dict:
    """GroupedMLP of the same model loads megatron-core's SequentialMLP checkpoint (its own resharding), saves its
    rank files (weight1/weight2) and a torch_dist checkpoint: both read as the SequentialMLP checkpoint does."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    grouped, args = _mcore_model(arch, seed=4, grouped=True)
    loaded = dist_checkpointing.load({"model": grouped.sharded_state_dict()}, str(out / "dist" / "iter_0000003"))
    grouped.load_state_dict(loaded["model"])
    for fmt in ("grouped_dist", "grouped_legacy"):
        (out / fmt / "iter_0000003").mkdir(parents=True, exist_ok=True)
        (out / fmt / "latest_checkpointed_iteration.txt").write_text("3")
    state = {"model": grouped.sharded_state_dict(), "args": args, "iteration": 3, "checkpoint_version": 3.0}
    dist_checkpointing.save(state, str(out / "grouped_dist" / "iter_0000003"))
    _save_legacy(grouped, args, out / "grouped_legacy" / "iter_0000003")
    dist.barrier()
    if dist.get_rank() != 0:
        return {}
    options = Options(vocab_size=VOCAB)
    reference = read("megatron", out / "dist", options)
    result = {}
    for fmt in ("grouped_dist", "grouped_legacy"):
        ckpt = read("megatron", out / fmt, options)
        result[f"{fmt}_equal"] = all(torch.equal(ckpt.get(n), reference.get(n)) for n in expected_shapes(ckpt.cfg))
    return result


def _scenario(arch: str, out: Path, tp: int, pp: int, ep: int = 1) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    rank = dist.get_rank()
    model, args = _mcore_model(arch, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()  # (dropout is 0; megatron-core's MoE refuses to train at TP > 1 without sequence parallelism)
    reference = _forward(model, ids)[..., :VOCAB].detach() if pp == 1 else None
    for fmt in ("dist", "legacy"):
        (out / fmt).mkdir(parents=True, exist_ok=True)
        (out / fmt / "latest_checkpointed_iteration.txt").write_text("3")
    iteration = out / "dist" / "iter_0000003"
    iteration.mkdir(exist_ok=True)
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 3, "checkpoint_version": 3.0}
    dist_checkpointing.save(state, str(iteration))
    _save_legacy(model, args, out / "legacy" / "iter_0000003")
    dist.barrier()
    result = {}
    options = Options(vocab_size=VOCAB)
    if rank == 0:
        from_dist, from_legacy = read("megatron", out / "dist", options), read("megatron", out / "legacy", options)
        names = expected_shapes(from_dist.cfg)
        result["dist_equals_legacy"] = all(torch.equal(from_dist.get(n), from_legacy.get(n)) for n in names)
        convert("megatron", "mlite", out / "dist", out / "ml", options)
        if reference is not None:  # compared by the test, outside the process group
            torch.save({"ids": ids, "reference": reference}, out / "reference.pt")
        layout = dict(megatron_tp=tp, megatron_pp=pp, megatron_ep=ep, megatron_spec="local")
        convert("mlite", "megatron", out / "ml", out / "ours_dist", Options(**layout))
        convert("mlite", "megatron", out / "ml", out / "ours_legacy", Options(megatron_format="torch", **layout))
        if tp == pp == ep == 1:  # TE names: what the local spec maps its norm names to in sharded checkpoints
            convert("mlite", "megatron", out / "ml", out / "ours_te", Options(megatron_format="torch"))
            keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
            state = model.state_dict()
            moe_layers = [k.removesuffix("mlp.router.weight") for k in state if k.endswith("mlp.router.weight")]
            expected = set()
            for k in state:
                if not k.startswith(tuple(f"{layer}pre_mlp_layernorm." for layer in moe_layers)):
                    for old, new in keys_map.items():  # TE's MoE layers keep their own pre_mlp_layernorm
                        k = k.replace(old, new)
                expected.add(k)
                if k.endswith("linear_qkv._extra_state"):
                    expected.add(k.replace("linear_qkv", "core_attention"))
            ours_te = torch.load(out / "ours_te/release/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
            result["te_names_match"] = set(ours_te) == expected
    dist.barrier()
    if ARCHS[arch].get("num_experts") and pp == 1:
        result.update(_grouped_forms(arch, out))
    fresh, _ = _mcore_model(arch, seed=2)
    legacy_file = out / "ours_legacy/release" / _rank_dir(pp, ep) / "model_optim_rng.pt"
    legacy = torch.load(legacy_file, weights_only=False)["model"]
    fresh.load_state_dict(legacy, strict=True)
    diffs = [_param_diff(model, dict(fresh.named_parameters()))]
    fresh, _ = _mcore_model(arch, seed=3)
    loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(out / "ours_dist" / "release"))
    fresh.load_state_dict(loaded["model"])
    diffs.append(_param_diff(model, dict(fresh.named_parameters())))
    worst = torch.tensor(diffs)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    result["our_legacy_param_diff"], result["our_dist_param_diff"] = worst.tolist()
    return result


def _passes(scenario: str) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(TP, PP, EP, archs) a scenario's processes run, one parallel layout after another; results of archs at EP > 1
    are named ARCH@epN."""
    if scenario == "tp2":
        return [(2, 1, 1, tuple(ARCHS)), (1, 1, 2, tuple(f"{a}@ep2" for a in MOE_ARCHS))]
    return [(1, 1, 1, tuple(ARCHS))] if scenario == "tp1" else [(1, 2, 1, PIPELINE_ARCHS)]


def _worker(scenario: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=3))
    _cpu_shims()
    results = {}
    for tp, pp, ep, archs in _passes(scenario):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
        for arch in archs:
            results[arch] = _scenario(arch.split("@")[0], Path(out) / arch, tp, pp, ep)
    if dist.get_rank() == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
