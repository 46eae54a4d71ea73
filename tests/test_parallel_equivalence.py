"""Every parallel layout trains the same model as one process: same losses, same final weights."""

import math
import tempfile

import pytest
import torch
from helpers import final_weights, launch, read_metrics, skip_without_async_io, tiny_overrides, train_job

LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2-gpipe": (2, ["parallel.pipeline=2", "parallel.pipeline_schedule=gpipe"]),
    "pp2-interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),  # virtual stages imply it
    # the pipeline's loss goes through the model's own loss path: here the chunked (fused) cross-entropy
    "pp2-fused-ce": (2, ["parallel.pipeline=2", "train.kernels={linear_cross_entropy: torch}"]),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "tp2xdp2-zero2-sp": (4, ["parallel.tensor=2", "parallel.zero_stage=2", "parallel.sequence_parallel=true"]),
    "pp2xdp2-zero-bubble": (
        4,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zero_bubble"],
    ),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2xdp2": (4, ["parallel.tensor=2"]),
    "pp2xdp2": (4, ["parallel.pipeline=2"]),
    # context parallelism: each sequence in 2 x cp load-balanced chunks, exact attention across them
    "cp2": (2, ["parallel.context=2"]),
    "cp2-allgather": (2, ["parallel.context=2", "parallel.context_attention=allgather"]),
    "cp2-recompute-fused-ce": (
        2,
        ["parallel.context=2", "train.recompute=selective", "train.kernels={linear_cross_entropy: torch}"],
    ),
    "cp2xtp2-sp": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "cp2xpp2": (4, ["parallel.context=2", "parallel.pipeline=2"]),
    "cp2xpp2-interleaved": (4, ["parallel.context=2", "parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "cp2xpp2-gpipe-full-recompute": (
        4,
        ["parallel.context=2", "parallel.pipeline=2", "parallel.pipeline_schedule=gpipe", "train.recompute=full"],
    ),
    "cp2xpp2-zero-bubble": (
        4,
        [
            "parallel.context=2",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "parallel.pipeline_schedule=zero_bubble",
        ],
    ),
    "cp2xdp2-distopt": (4, ["parallel.context=2", "parallel.distributed_optimizer=true"]),
    "cp4": (4, ["parallel.context=4"]),
    "tp2xpp2xdp2": (
        8,
        [
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.sequence_parallel=true",
            "parallel.distributed_optimizer=true",
        ],
    ),
}


# Several DP buckets: 16 KB is less than one layer's parameters, so the overlapped multi-bucket reduction and
# the multi-bucket ZeRO sharding run. Evaluation runs at the last step, through the pipeline and DP too.
# Adam's eps is 1e-5: with 1e-8 an element whose gradient is ~0 moves by lr/eps times its rounding error, so
# summation order alone (what a layout changes) moves it by ~1e-5; at 1e-5 the layouts agree to ~1e-7.
COMMON = {
    "model.num_layers": 4,
    "train.steps": 5,
    "train.global_batch_size": 8,
    "checkpoint.interval": 0,
    "parallel.bucket_mb": 0.016,
    "train.eval_interval": 5,
    "train.eval_iters": 2,
    "optim.eps": 1.0e-5,
}
# Tolerances per precision. fp32: reduction order only (losses and grad norms to 1e-5, weights to 3e-6: with
# megatron-core's sample order a few elements of the last layer's projection, their gradients near 0, move by
# up to 1.4e-6 between layouts, their rounding differences amplified by lr / eps as above; all others < 4e-7).
# bf16 / fp16: autocast GEMMs round their outputs to 8 / 11 mantissa bits, and a layout changes which partial
# sums are rounded, so losses agree to about 1e-2 / 2e-3 and weights after 5 steps to a few lr-sized steps.
TOLERANCE = {  # precision: (loss and eval loss rel, grad norm rel, weights atol)
    "fp32": (1e-5, 1e-5, 3e-6),
    "bf16": (2e-2, 5e-2, 2e-2),
    "fp16": (5e-3, 2e-2, 5e-3),
}
PRECISION_LAYOUTS = {  # multi-process runs in mixed precision, each against one process in the same precision
    "cp2xtp2-sp-bf16": (
        4,
        ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "train.precision=bf16"],
    ),
    "cp2-fp16": (2, ["parallel.context=2", "train.precision=fp16"]),
    "tp2-sp-bf16": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.precision=bf16"]),
    "pp2xdp2-distopt-fp16": (
        4,
        ["parallel.pipeline=2", "parallel.distributed_optimizer=true", "train.precision=fp16"],
    ),
    # DeepSpeed's bf16: the model in bf16 and fp32 master weights in its optimizer, against autocast over fp32
    "ds-zero2-bf16": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2", "train.precision=bf16"]),
    # DeepSpeed's fp16 scales the loss in its backward: MoE's balance and z losses must carry its scale too
    "ds-zero2-fp16": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2", "train.precision=fp16"]),
}


# model name -> (arch preset, feature overrides). "features": every feature the presets do not already cover in
# one model: Qwen3's per-head q/k norms (a gradient partial over TP) with a head size that is not hidden / heads,
# biases on every linear layer, llama3 rope scaling and a sliding window shorter than a sequence and longer than
# a CP chunk (so it cuts across chunks and ring steps); packed samples of short documents with document masking
# and the end-of-document loss mask (it trains on the `short_docs` corpus, so every sample crosses documents).
MODELS = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "features": (
        "qwen3",
        {
            "model.head_dim": 24,
            "model.bias": "true",
            "model.sliding_window": 24,
            "model.rope_scaling": "{type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
            "original_max_position_embeddings: 16}",
            "data.document_mask": "true",
            "data.eod_mask_loss": "true",
        },
    ),
    # mixtures of experts (every expert on every rank unless a layout splits them): a softmax router with the
    # balance and z losses and a gated shared expert in every layer; a sigmoid router with scaled weights and
    # the aux-loss-free selection bias (its load summed over DP x CP each step) in every other layer
    "moe-softmax": (
        "llama",
        {
            "model.moe.num_experts": 4,
            "model.moe.ffn_hidden_size": 48,
            "model.moe.aux_loss_coeff": 0.01,
            "model.moe.z_loss_coeff": 0.001,
            "model.moe.shared_expert_ffn_hidden_size": 32,
            "model.moe.shared_expert_gate": "true",
        },
    ),
    "moe-sigmoid": (
        "llama",
        {
            "model.moe.num_experts": 4,
            "model.moe.router": "sigmoid",
            "model.moe.scaling_factor": 2.0,
            "model.moe.bias_update_rate": 0.01,
            "model.moe.layer_freq": 2,
        },
    ),
    # a capacity (each expert takes at most its fair share: some assignments dropped in every micro-batch): the
    # ranks holding one micro-batch's tokens (CP, SP) drop what one process drops
    "moe-capacity": ("llama", {"model.moe.num_experts": 4, "model.moe.capacity_factor": 1.0}),
}
# the layouts the features model runs in: each way a parameter or the sequence is split, recompute (packed
# documents through a pipeline and full recompute of their masks), and mixed precision
FEATURE_LAYOUTS = {
    name: LAYOUTS[name]
    for name in (
        *("tp2", "tp2-sp", "pp2", "tp2xpp2", "cp2", "cp2-allgather", "cp2xtp2-sp"),
        "cp2xpp2-gpipe-full-recompute",
    )
}
FEATURE_LAYOUTS["tp2-selective-recompute"] = (2, ["parallel.tensor=2", "train.recompute=selective"])
# two stages on each rank: each takes its micro-batch's documents by the index the schedule runs
FEATURE_LAYOUTS["pp2-zero-bubble"] = (
    2,
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zero_bubble"],
)


@pytest.fixture(scope="module")
def overrides(corpus, short_docs):
    def get(run_dir, model, precision="fp32"):
        arch, features = MODELS[model]
        data = short_docs if model == "features" else corpus
        return tiny_overrides(data, run_dir, arch, **COMMON, **features, **{"train.precision": precision})

    return get


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides):
    """One process per (flavour, precision), run on first use."""
    runs = {}

    def get(arch, precision="fp32"):
        if (arch, precision) not in runs:
            run = tmp_path_factory.mktemp(f"ref-{arch}-{precision}") / "run"
            done = train_job("configs/demo.yaml", run, 1, overrides(run, arch, precision))
            assert done.returncode == 0, done.stderr[-3000:]
            runs[arch, precision] = (read_metrics(run), final_weights(run))
        return runs[arch, precision]

    return get


def assert_equivalent(run, reference, precision):
    loss_tol, norm_tol, weight_tol = TOLERANCE[precision]
    ref_metrics, ref_weights = reference
    metrics = read_metrics(run)
    assert len(metrics) == len(ref_metrics) == 5
    for got, want in zip(metrics, ref_metrics):
        assert math.isclose(got["loss"], want["loss"], rel_tol=loss_tol), (got["step"], got["loss"], want["loss"])
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=norm_tol), got["step"]
    assert "eval_loss" in metrics[-1]
    assert math.isclose(metrics[-1]["eval_loss"], ref_metrics[-1]["eval_loss"], rel_tol=loss_tol)
    weights = final_weights(run)
    assert weights.keys() == ref_weights.keys()
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=weight_tol, msg=name)


# gpt2 where its own parts meet a layout (learned positions under SP and CP, biases and LayerNorm under TP, the tied
# embedding over pipeline stages and in the late DP sync); the schedules, recompute and ZeRO variants are llama's
GPT2_LAYOUTS = ("tp2", "tp2-sp", "pp2", "dp2-distopt", "tp2xpp2", "cp2", "cp2xtp2-sp", "tp2xpp2xdp2")
LAYOUT_CASES = [("llama", layout) for layout in LAYOUTS] + [("gpt2", layout) for layout in GPT2_LAYOUTS]
LAYOUT_CASES += [("features", layout) for layout in FEATURE_LAYOUTS]
# expert parallelism, carved out of dp x cp: tokens exchanged all-to-all, expert gradients reduced over the
# ranks holding the same experts (ZeRO-sharded over them with the distributed optimizer)
MOE_LAYOUTS = {
    "ep2": (2, ["parallel.expert=2"]),
    "ep4": (4, ["parallel.expert=4"]),
    "ep2xdp2-distopt": (4, ["parallel.expert=2", "parallel.distributed_optimizer=true"]),
    "ep2xpp2": (4, ["parallel.expert=2", "parallel.pipeline=2"]),
    "ep2-over-cp2": (2, ["parallel.expert=2", "parallel.context=2"]),
    # TP with whole experts on every TP rank: under SP each routes its own tokens (expert and router gradients
    # summed over TP), the balance loss's shares over the whole sequence
    "ep2xtp2-sp": (4, ["parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
}
# the DeepSpeed engine: its ZeRO stages over the grad group, CPU offload with its C++ Adam, ZeRO-3 under TP. ZeRO-3
# keeps parameters under 1e5 elements whole by default (all of this model's): the threshold 0, set through the
# deepspeed: section, partitions every one
DS = ["parallel.engine=deepspeed"]
DS_ZERO3 = [*DS, "parallel.zero_stage=3", "deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
DEEPSPEED_LAYOUTS = {
    "ds-zero1": (2, [*DS, "parallel.zero_stage=1"]),
    "ds-zero2": (2, [*DS, "parallel.zero_stage=2"]),
    "ds-zero3": (2, DS_ZERO3),
    "ds-zero3-offload": (2, [*DS_ZERO3, "optim.offload=cpu"]),
    # parameters and optimizer states swapped to a directory through DeepSpeed's async_io op (libaio)
    "ds-zero3-nvme": (2, [*DS_ZERO3, "optim.offload=nvme", f"optim.nvme_path={tempfile.gettempdir()}/mlite-nvme"]),
    "ds-zero3xtp2": (4, [*DS_ZERO3, "parallel.tensor=2"]),
    "ds-zero2xcp2": (2, [*DS, "parallel.zero_stage=2", "parallel.context=2"]),  # its DP group is DP x CP
}
MOE_CASES = {
    "moe-softmax": ("pp2", "dp2-distopt", "cp2", "ep2", "ep4", "ep2xdp2-distopt", "ep2xtp2-sp"),
    "moe-sigmoid": ("pp2xdp2", "cp2xpp2-gpipe-full-recompute", "ep2xpp2", "ep2-over-cp2", "tp2"),
    "moe-capacity": ("cp2", "tp2-sp", "cp2xtp2-sp", "ep2-over-cp2", "cp2xpp2-gpipe-full-recompute"),
}
LAYOUT_CASES += [(model, layout) for model, layouts in MOE_CASES.items() for layout in layouts]
LAYOUT_CASES += [("llama", layout) for layout in DEEPSPEED_LAYOUTS]
LAYOUT_OF = {**LAYOUTS, **FEATURE_LAYOUTS, **MOE_LAYOUTS, **DEEPSPEED_LAYOUTS}
PRECISION_CASES = [
    (model, layout) for model in ("llama", "gpt2") for layout in PRECISION_LAYOUTS if "ds-" not in layout
]
PRECISION_CASES.append(("llama", "ds-zero2-bf16"))
PRECISION_CASES.append(("moe-softmax", "ds-zero2-fp16"))
PRECISION_CASES.append(("features", "tp2-sp-bf16"))


# The jobs' workers are forked from one process (helpers.run_job); this case's start as torchrun starts them, each
# an interpreter of its own (its own string-hash seed: ranks that walked a set in different orders would show here)
THROUGH_TORCHRUN = ("llama", "tp2xpp2xdp2")


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", LAYOUT_CASES)
def test_layout_equals_single_process(tmp_path, overrides, reference, arch, layout):
    nproc, sets = LAYOUT_OF[layout]
    skip_without_async_io(sets)
    run = tmp_path / "run"
    job = launch if (arch, layout) == THROUGH_TORCHRUN else train_job
    done = job("configs/demo.yaml", run, nproc, overrides(run, arch) + sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(run, reference(arch), "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", PRECISION_CASES)
def test_mixed_precision_layout_equals_single_process(tmp_path, overrides, reference, arch, layout):
    nproc, sets = PRECISION_LAYOUTS[layout]
    precision = next(s.split("=")[1] for s in sets if s.startswith("train.precision="))
    run = tmp_path / "run"
    done = train_job("configs/demo.yaml", run, nproc, overrides(run, arch, precision) + sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(run, reference(arch, precision), precision)


@pytest.mark.slow
def test_global_balance_loss_equals_one_process_over_the_global_batch(tmp_path, overrides):
    """aux_loss_scope global at ep2 (dp2): each rank's micro-batch of 2 sequences weighs the assignments of both
    ranks', as one process's micro-batch of all 4 does (the micro_batch scope weighs each rank's own 2 apart);
    under full recompute, whose second forward must reuse the shares of the first."""
    sets = ["model.moe.aux_loss_scope=global", "model.moe.aux_loss_coeff=0.1", "train.global_batch_size=4"]
    runs = {}
    for nproc, layout in ((1, ["train.micro_batch_size=4"]), (2, ["parallel.expert=2", "train.recompute=full"])):
        run = runs[nproc] = tmp_path / f"run{nproc}"
        done = train_job("configs/demo.yaml", run, nproc, overrides(run, "moe-softmax") + sets + layout)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent(runs[2], (read_metrics(runs[1]), final_weights(runs[1])), "fp32")
