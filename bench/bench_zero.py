"""ZeRO stages side by side: native ZeRO-1 and ZeRO-2 against DeepSpeed's ZeRO-2 and ZeRO-3, on this CPU; and the
analytic per-GPU state bytes of the 1B and 8B presets, checked against what the runs here hold.

    python bench/bench_zero.py [--steps 10] [--markdown bench/results/zero.md]

Part 1, one run: the demo model (configs/demo.yaml) at dp2, each engine in its own 2-worker job: the median step
time (logged steps after the first two) and the tensor bytes each rank holds after training (every live storage,
counted once: model, gradients, optimizer, the engine's buffers), beside the planner's count for the same layout
(plan/memory.py, plan/deepspeed_memory.py: weights + optimizer + gradients, buckets apart).
Part 2: the planner's model-state bytes per GPU of configs/models/llama-1b.yaml and llama-8b.yaml in bf16 at
dp 8 and 64 (TP = PP = 1), for native ZeRO 0-2, DeepSpeed ZeRO-3 and DeepSpeed ZeRO-2 / ZeRO-3 with CPU offload;
and the fewest 80 GB GPUs each fits on (states, one micro-batch of 4096 tokens' activations and the allowance).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import emit, run_under_torchrun

from megatronlite import config
from megatronlite.plan.estimate import gpu_options
from megatronlite.plan.measure import live_tensor_bytes
from megatronlite.plan.memory import layout_memories, model_states

GiB = 2**30
ENGINES = {  # name: overrides
    "native ZeRO-1": ["parallel.zero_stage=1"],
    "native ZeRO-2": ["parallel.zero_stage=2"],
    "DeepSpeed ZeRO-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "DeepSpeed ZeRO-3": [
        "parallel.engine=deepspeed",
        "parallel.zero_stage=3",
        "deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ],
}
PRESET_RUNS = {  # name: overrides, all bf16
    "native ZeRO-0": ["parallel.zero_stage=0"],
    "native ZeRO-1": ["parallel.zero_stage=1"],
    "native ZeRO-2": ["parallel.zero_stage=2"],
    "native ZeRO-1 + cpu offload": ["parallel.zero_stage=1", "optim.offload=cpu"],
    "DeepSpeed ZeRO-3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "DeepSpeed ZeRO-2 + cpu offload": ["parallel.engine=deepspeed", "parallel.zero_stage=2", "optim.offload=cpu"],
    "DeepSpeed ZeRO-3 + cpu offload": ["parallel.engine=deepspeed", "parallel.zero_stage=3", "optim.offload=cpu"],
}
RUN = ["train.eval_interval=0", "logging.interval=1", "checkpoint.save=false", "checkpoint.load=null"]


def worker(run_dir: str, steps: int, sets: list[str]) -> None:
    """(Under torchrun.) Train; record this rank's held bytes."""
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train.trainer import Trainer

    world, rank, _ = init_distributed("cpu", 10)
    run = Path(run_dir)
    cfg = config.load("configs/demo.yaml", [*sets, *RUN, f"train.steps={steps}", "train.device=cpu"])
    before = live_tensor_bytes()
    trainer = Trainer(cfg, run, build_mesh(cfg, world, rank), torch.device("cpu"))
    trainer.run()
    (run / f"held{rank}.json").write_text(json.dumps(live_tensor_bytes() - before))


def measured(steps: int) -> list[str]:
    rows = []
    for name, sets in ENGINES.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            run.mkdir()
            done = run_under_torchrun(__file__, ["--worker", str(run), str(steps), *sets], nproc=2)
            if done.returncode != 0:
                sys.exit(f"{name}: {done.stderr[-3000:]}")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records, records[1:])][2:]
            held = [json.loads((run / f"held{r}.json").read_text()) for r in range(2)]
        cfg = config.load("configs/demo.yaml", [*sets, *RUN])
        s = model_states(cfg, 2, 0)
        planned = s.weights + s.optimizer + s.grads
        rows.append(
            f"| {name} | {statistics.median(times) * 1e3:.0f} | {held[0] / 2**20:.2f} / {held[1] / 2**20:.2f} | "
            f"{s.weights / 2**20:.2f} + {s.optimizer / 2**20:.2f} + {s.grads / 2**20:.2f} = {planned / 2**20:.2f} |"
        )
    return rows


def fewest_gpus(path: str, sets: list[str], limit: int = 4096) -> int | None:
    """The smallest DP size (TP = PP = 1, micro-batch 1 of 4096 tokens) whose heaviest rank fits in 80 GB."""
    dp = 1
    while dp <= limit:
        cfg = preset(path, sets, dp)
        if max(m.total for m in layout_memories(cfg, dp, gpu_options(cfg)).values()) <= 80e9:
            return dp
        dp *= 2
    return None


def preset(path: str, sets: list[str], dp: int) -> config.Config:
    fixed = ["train.precision=bf16", "train.seq_len=4096", "train.micro_batch_size=1"]
    return config.load(path, [*fixed, f"train.global_batch_size={dp}", *sets])


def analytic() -> list[str]:
    rows = []
    for path in ("configs/models/llama-1b.yaml", "configs/models/llama-8b.yaml"):
        for name, sets in PRESET_RUNS.items():
            states = []
            for dp in (8, 64):
                s = model_states(preset(path, sets, dp), dp, 0)
                states.append((s.weights + s.weight_copies + s.grads + s.optimizer) / GiB)
            fewest = fewest_gpus(path, sets)
            rows.append(
                f"| {Path(path).stem} | {name} | {states[0]:.2f} | {states[1]:.2f} | "
                f"{fewest if fewest is not None else '> 4096'} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--markdown")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        run_dir, steps, *sets = args.worker
        worker(run_dir, int(steps), sets)
        return
    torch.set_num_threads(1)
    header = (
        f"## ZeRO stages, native and DeepSpeed ({datetime.date.today()}, {platform.node()}, "
        f"{torch.get_num_threads()} thread(s) per worker, torch {torch.__version__})\n\n"
        f"`python bench/bench_zero.py --steps {args.steps}`\n\n"
        "Demo model (configs/demo.yaml), fp32, dp2 on this CPU, 2 gloo workers:\n\n"
        "Held: measured after the last step (DeepSpeed ZeRO-2 has freed its gradient partition by then; the planner "
        "counts it, as it is held through each step; ZeRO-3's grads include its reduce bucket).\n\n"
        "| engine | step time (ms, median) | held per rank (MiB, rank 0 / 1) | planned: weights + optimizer + "
        "grads (MiB) |\n|---|---|---|---|"
    )
    emit("\n".join([header, *measured(args.steps)]), args.markdown)
    table = (
        "Planned model states per GPU (GiB; weights + autocast copies + gradients + optimizer, bf16, TP = PP = 1)"
        " and the fewest 80 GB GPUs (DP size, a power of 2) whose heaviest rank fits with one 4096-token "
        "micro-batch's activations:\n\n| preset | engine | dp 8 | dp 64 | fewest GPUs |\n|---|---|---|---|---|"
    )
    emit("\n".join([table, *analytic()]), args.markdown)


if __name__ == "__main__":
    main()
