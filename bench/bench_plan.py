"""The planner against published training runs: its prediction for the layout they used, beside their figures.

    python bench/bench_plan.py [--markdown bench/results/plan.md]

Each run is the model, GPU count and type, sequence, batch and layout its paper states, and the
throughput it reports. The planner predicts that exact layout (no search) at its assumed matmul
efficiency (plan/hardware.py: no calibration), so the difference is the planner's error on runs it
was not fitted to. MFU here is model FLOPs (6 N + attention, no recompute) over the dense bf16 peak;
papers that count recomputed FLOPs ("hardware FLOPs") are converted to model FLOPs in the table.

Sources:
- GPT-3 175B: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM", its end-to-end training-time estimate: 1024 A100s, batch 1536, seq 2048, full
  activation recompute, 140 TFLOP/s per GPU counted with recompute (their 8 x params per token, our
  6 x: 105 TFLOP/s of model FLOPs), 34 days for 300B tokens. The layout, TP 8 x PP 16 (its table's
  for this model) with DP 8 at 1024 GPUs and the plain 1F1B schedule, is our reading.
- 530B (the MT-NLG shape): Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models": 2240 A100s, 105 layers, hidden 20480, 128 heads, seq 2048, TP 8 x PP 35 (DP 8), batch 2240, MFU
  54.2% with sequence parallelism and selective recompute, 42.1% with full recompute. The 1F1B schedule (no
  virtual stages) is our reading.
- Llama 3 405B: Dubey et al. 2024, "The Llama 3 Herd of Models", table 4: 16,384 H100s, seq 8192,
  16M tokens per batch, TP 8 x CP 1 x PP 16 x DP 128, BF16 MFU 38-43% (41% at 16,384 GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from dataclasses import dataclass

from common import emit

from megatronlite import config
from megatronlite.plan import hardware
from megatronlite.plan.estimate import Planner, gpu_options
from megatronlite.plan.layout import Layout, apply
from megatronlite.plan.megatron_reference import differences, megatron_memory
from megatronlite.plan.memory import layout_memories


@dataclass(frozen=True)
class Published:
    name: str
    sets: list[str]  # the model and run, as config overrides of a blank config
    gpus: int
    gpu: str
    layout: Layout
    reported_mfu: float  # model FLOPs over the bf16 peak, as reported (converted where the paper counts more)
    reported: str  # what the paper says, in its words


GPT3 = [
    "model.arch=gpt2",
    "model.num_layers=96",
    "model.hidden_size=12288",
    "model.num_heads=96",
    "model.vocab_size=51200",
    "model.max_seq_len=2048",
    "train.seq_len=2048",
    "train.global_batch_size=1536",
    "train.precision=bf16",
]
MT_NLG_530B = [
    "model.arch=gpt2",
    "model.num_layers=105",
    "model.hidden_size=20480",
    "model.num_heads=128",
    "model.vocab_size=51200",
    "model.max_seq_len=2048",
    "train.seq_len=2048",
    "train.global_batch_size=2240",
    "train.precision=bf16",
]
LLAMA3_405B = [
    "model.arch=llama",
    "model.num_layers=126",
    "model.hidden_size=16384",
    "model.num_heads=128",
    "model.num_kv_heads=8",
    "model.ffn_hidden_size=53248",
    "model.vocab_size=128256",
    "model.max_seq_len=8192",
    "model.rope_theta=500000.0",
    "train.seq_len=8192",
    "train.global_batch_size=2048",
    "train.precision=bf16",
    # 126 layers over 16 stages: the first and last hold one layer fewer (Llama 3 balances embedding and loss)
    "parallel.pipeline_layers=[7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7]",
]
RUNS = [
    Published(
        "GPT-3 175B (Megatron-LM)",
        GPT3,
        1024,
        "a100",
        Layout(tp=8, pp=16, vp=1, cp=1, dp=8, micro_batch=1, zero=0, recompute="full", sequence_parallel=False),
        105e12 / 312e12,
        "140 TFLOP/s per GPU with recompute (105 of model FLOPs), 34 days for 300B tokens",
    ),
    Published(
        "530B, SP + selective recompute (Korthikanti et al.)",
        MT_NLG_530B,
        2240,
        "a100",
        Layout(tp=8, pp=35, vp=1, cp=1, dp=8, micro_batch=1, zero=0, recompute="selective", sequence_parallel=True),
        0.542,
        "MFU 54.2% on 2240 A100s",
    ),
    Published(
        "530B, full recompute (Korthikanti et al.)",
        MT_NLG_530B,
        2240,
        "a100",
        Layout(tp=8, pp=35, vp=1, cp=1, dp=8, micro_batch=1, zero=0, recompute="full", sequence_parallel=False),
        0.421,
        "MFU 42.1% on 2240 A100s (the same run recomputing every layer)",
    ),
    Published(
        "Llama 3 405B",
        LLAMA3_405B,
        16384,
        "h100",
        Layout(tp=8, pp=16, vp=1, cp=1, dp=128, micro_batch=1, zero=1, recompute="none", sequence_parallel=True),
        0.41,
        "BF16 MFU 41% at 16,384 GPUs (38-43% over their runs), 400 TFLOP/s per GPU",
    ),
]


def predict(run: Published) -> str:
    cfg = config.from_dict(config.apply_overrides({}, run.sets))
    efficiency, source = hardware.efficiency(run.gpu)
    e = Planner(cfg, run.gpus, 8, hardware.gpu(run.gpu), efficiency).estimate(run.layout)
    days = 300e9 / e.tokens_per_sec / 86400
    error = e.mfu / run.reported_mfu - 1
    return (
        f"| {run.name} | {run.gpus} x {run.gpu} | {run.layout.name()} | {e.memory.total / 2**30:.1f} GiB "
        f"(stage {e.stage}) | {e.mfu:.1%} ({efficiency:.2f}, {source}) | {run.reported_mfu:.1%} | {error:+.0%} "
        f"| {days:.1f} | {run.reported} |"
    )


def against_megatron(run: Published) -> str:
    """One row: Megatron-LM's theoretical memory for the run's layout beside the planner's first stage, the raw
    differences, what is left after the named causes (plan/megatron_reference.py), and the largest causes."""
    cfg = apply(config.from_dict(config.apply_overrides({}, run.sets)), run.layout)
    options = gpu_options(cfg)
    ours = layout_memories(cfg, run.gpus, options)[0]
    megatron = megatron_memory(cfg, run.gpus)
    weight_causes, activation_causes = differences(cfg, run.gpus, options.kernels["swiglu"] != "torch")
    ours_states = ours.weights + ours.weight_copies + ours.grads + ours.optimizer
    cells = [run.name, run.layout.name()]
    for figure, reference, causes in (
        (ours_states, megatron.weights_and_optimizer, weight_causes),
        (ours.activations, megatron.activations, activation_causes),
    ):
        left = figure / (reference + sum(causes.values())) - 1
        gib = f"{reference / 2**30:.1f} / {figure / 2**30:.1f} GiB"
        cells.append(f"{gib}: {figure / reference - 1:+.0%}, {left:+.1%} left")
    causes = sorted({**weight_causes, **activation_causes}.items(), key=lambda kv: -abs(kv[1]))[:3]
    cells.append("; ".join(f"{name} {value / 2**30:+.1f} GiB" for name, value in causes))
    if cfg.train.recompute == "full":
        cells[-1] = "not comparable: the formula ignores full recompute (it counts every activation); " + cells[-1]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", help="append the result to this file")
    args = ap.parse_args()
    lines = [
        f"## The planner against published runs, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_plan.py`; machine: {platform.machine()} (the planner runs on the CPU)",
        "- prediction for the layout each run used, at the planner's assumed efficiency (not fitted to these runs)",
        "",
        "| run | GPUs | layout | predicted memory/GPU | predicted MFU (efficiency) | reported MFU | error "
        "| predicted days / 300B tokens | reported |",
        "|---|---|---|---|---|---|---|---|---|",
        *(predict(run) for run in RUNS),
        "",
        "Against Megatron-LM's theoretical memory (`report_theoretical_memory`: Korthikanti et al. 2022, table 2),",
        "the first stage's rank of each layout; each cell is Megatron's figure / the planner's, the raw",
        "difference, and what is left once the named causes are added to Megatron's figure:",
        "",
        "| run | layout | weights + grads + optimizer | activations | largest causes |",
        "|---|---|---|---|---|",
        *(against_megatron(run) for run in RUNS),
    ]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
