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
from megatronlite.plan.estimate import Planner
from megatronlite.plan.layout import Layout


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
    ]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
