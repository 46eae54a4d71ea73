"""Bytes each collective kind moves in one training step, counted by wrapping torch.distributed.

    python bench/collective_bytes.py [--config configs/demo.yaml] [--markdown bench/results/collective_bytes.md]

Runs the demo model for tp2, pp2 and dp2 (2 gloo processes each, through torchrun), counts the
payload of every call (the tensor passed in; for all_gather / reduce_scatter the per-rank
input, not the algorithm's wire traffic) in the second step on rank 0, and prints it next to
the analytic expectation derived from the model shape:

- tp2: per micro-batch, forward all-reduces the embedding output and each layer's attention and
  MLP output ([b, s, h] each: 2L + 1), backward all-reduces the gradient of every column-parallel
  input (QKV, fc1 per layer, the output layer: 2L + 1); the vocab-parallel loss all-reduces 3
  scalars per token (max, target logit, sum of exponentials).
- pp2: per micro-batch, the activation [b, s, h] goes forward and its gradient back.
- dp2: every gradient once per step (all-reduce of the gradient buckets).
- ep2 (the demo with 8 experts, top-2, split over the 2 ranks): per MoE layer and micro-batch, the per-expert
  counts (8 bytes each) and then every dispatched row (tokens x top_k of [h] fp32) all-to-all out and back,
  forward and backward; the payload counted is each call's input, the rows staying on the rank included, and
  compared summed over both ranks (what one rank receives back depends on the routing, the total does not).
Every layout adds a few scalars per step (loss, grad norm, the save-and-stop flag).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from common import emit, run_under_torchrun

MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=384"]  # demo-moe.yaml's experts
LAYOUTS = {"tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"], "dp2": [], "ep2": [*MOE, "parallel.expert=2"]}
KINDS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_to_all_single",
)


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def install_counters(counts: dict, active: list) -> None:
    """Wrap every collective and point-to-point call so its payload is added to counts[kind].

    batch_isend_irecv calls isend / irecv for each op, so pipeline traffic is counted there."""
    for kind in KINDS:
        original = getattr(dist, kind)

        @functools.wraps(original)
        def wrapper(*args, _original=original, _kind=kind, **kwargs):
            if active[0]:
                sent = _kind.startswith(("all_gather", "reduce_scatter", "all_to_all"))  # (output, input, ...)
                counts[_kind] += _nbytes(args[1] if sent else args[0])
            return _original(*args, **kwargs)

        setattr(dist, kind, wrapper)
        setattr(c10d, kind, wrapper)  # P2POp checks its op against c10d's own isend / irecv


def worker(config: str, sets: list[str]) -> None:
    counts: dict[str, int] = defaultdict(int)
    active = [False]
    install_counters(counts, active)
    from megatronlite import config as config_mod
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train.trainer import Trainer

    cfg = config_mod.load(config, sets + ["checkpoint.save=false", "train.device=cpu"])
    world, rank, _ = init_distributed("cpu", 5)
    trainer = Trainer(
        cfg, __import__("pathlib").Path("/tmp/collective-bytes"), build_mesh(cfg, world, rank), torch.device("cpu")
    )
    loader = iter(trainer._loader(trainer.train_ds, 0))
    trainer.train_step(next(loader))  # warm-up: pipeline shape inference happens here
    active[0] = True
    trainer.train_step(next(loader))
    active[0] = False
    loader.close()
    if counts.get("all_to_all_single"):  # what a rank receives depends on the routing: the total over ranks does not
        total = torch.tensor([counts["all_to_all_single"]], dtype=torch.float64)
        dist.all_reduce(total)
        counts["all_to_all_single, all ranks"] = int(total.item())
    if rank == 0:
        print("COUNTS " + json.dumps(dict(counts)))
    dist.destroy_process_group()


def expected(cfg, layout: str) -> dict[str, int]:
    m, t = cfg.model, cfg.train
    n_micro = t.global_batch_size // t.micro_batch_size // (2 if layout in ("dp2", "ep2") else 1)  # per rank
    act = t.micro_batch_size * t.seq_len * m.hidden_size * 4
    if layout == "tp2":
        per_micro = 2 * (2 * m.num_layers + 1) * act + 3 * t.micro_batch_size * t.seq_len * 4
        return {"all_reduce": n_micro * per_micro}
    if layout == "pp2":
        return {"isend": n_micro * act, "irecv": n_micro * act}
    if layout == "ep2":  # per MoE layer and micro-batch, each rank sends its counts, its tokens x top_k rows, the
        # rows it received back, and in backward both again; over the ranks every row is sent once each way
        rows = t.micro_batch_size * t.seq_len * m.moe.top_k * m.hidden_size * 4
        per_layer = m.moe.num_experts * 8 + 4 * rows
        return {"all_to_all_single, all ranks": 2 * n_micro * sum(m.moe.layers(m.num_layers)) * per_layer}
    from megatronlite.models.counting import parameter_count

    padded = (m.padded_vocab_size() - m.vocab_size) * m.hidden_size * (1 if m.tied else 2)
    return {"all_reduce": (parameter_count(m) + padded) * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    if args.layout:
        worker(args.config, LAYOUTS[args.layout])
        return
    from megatronlite import config as config_mod

    lines = [
        f"## Bytes per collective kind, one step of {args.config}, {datetime.date.today()}",
        "",
        "- command: `python bench/collective_bytes.py`",
        "",
        "| layout | kind | counted (rank 0) | expected |",
        "|---|---|---|---|",
    ]
    for layout, sets in LAYOUTS.items():
        out = run_under_torchrun(__file__, ["--config", args.config, "--layout", layout])
        if out.returncode:
            sys.exit(f"{layout} failed:\n{out.stderr[-3000:]}")
        out = out.stdout
        counts = json.loads(next(line for line in out.splitlines() if line.startswith("COUNTS "))[7:])
        cfg = config_mod.load(args.config, sets)
        exp = expected(cfg, layout)
        for kind, value in sorted(counts.items()):
            want = f"{exp[kind]:,}" if kind in exp else "not modelled"
            lines.append(f"| {layout} | {kind} | {value:,} | {want} |")
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
