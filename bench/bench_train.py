"""Training tokens/s (and MFU, peak memory on GPU) of megatronlite against its peers, in one run.

Peers: HF transformers' LlamaForCausalLM (sdpa attention) and, on CUDA, megatron-core's GPTModel
with its local (non-Transformer-Engine) layer spec. All train the same random token batches with
torch's AdamW (fused where the device has it), the same batch, sequence length and precision
(bf16 = autocast over fp32 weights for all), alternating in rounds (first one, then the other
first) so machine load hits them alike.

    python bench/bench_train.py [--config configs/demo.yaml] [--device cpu|cuda] [--precision fp32|bf16]
        [--steps 10] [--rounds 6] [--markdown bench/results/train_cpu.md]

On CPU megatron-core's model cannot run (its tensor-parallel layers need CUDA), so it is listed
as skipped. On a GPU, e.g.: `--config configs/models/llama-1b.yaml --set train.seq_len=2048
--set train.micro_batch_size=4 --set train.global_batch_size=4 --device cuda --precision bf16`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from common import emit

from megatronlite import config
from megatronlite.models.counting import flops_per_token
from megatronlite.train.metrics import mfu, peak_flops
from megatronlite.train.trainer import run_options

Step = Callable[[list[torch.Tensor]], None]


def megatronlite_step(cfg, device, n_micro) -> Step:
    from megatronlite.models.gpt import GPTModel
    from megatronlite.models.init import init_parameters
    from megatronlite.optim.adamw import build_adamw

    model = GPTModel(cfg.model, options=run_options(cfg, device)).to(device)
    init_parameters(model, cfg.model, seed=0)
    opt, _ = build_adamw(dict(model.named_parameters()), cfg.optim, device)

    def step(micro_batches):
        for tokens in micro_batches:
            (model(tokens[:, :-1], tokens[:, 1:]) / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(cfg, device, n_micro) -> Step:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.kv_heads,
            max_position_embeddings=m.max_seq_len,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            tie_word_embeddings=m.tied,
            attn_implementation="sdpa",
        )
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)

    def step(micro_batches):
        for tokens in micro_batches:
            # HF shifts labels itself: the same seq_len predictions as the others, minus one
            (model(input_ids=tokens[:, 1:], labels=tokens[:, 1:]).loss / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mcore_step(cfg, device, n_micro) -> Step:
    """megatron-core's GPTModel, local layer spec, TP = PP = 1 (CUDA only)."""
    if device.type != "cuda":
        raise RuntimeError("megatron-core's layers need CUDA")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29599")
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    m = cfg.model
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.kv_heads,
        ffn_hidden_size=m.ffn_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        layernorm_epsilon=m.norm_eps,
        bf16=cfg.train.precision == "bf16",
        params_dtype=torch.float32,
    )
    model = GPTModel(
        tc,
        get_gpt_layer_local_spec(),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_seq_len,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tied,
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    positions = torch.arange(cfg.train.seq_len, device=device)[None]

    def step(micro_batches):
        for tokens in micro_batches:
            ids = tokens[:, :-1]
            loss = model(ids, positions.expand_as(ids), None, labels=tokens[:, 1:]).mean()
            (loss / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


PEERS = {
    "megatronlite": megatronlite_step,
    "HF LlamaForCausalLM (sdpa)": hf_step,
    "megatron-core GPTModel (local spec)": mcore_step,
}


def time_steps(step: Step, batches, autocast, device) -> float:
    """Seconds for one optimizer step per batch, after one warm-up step."""
    with autocast():
        step(batches[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_ratio(values: list[float], base: list[float]) -> str:
    """Median and quartiles of the per-round ratios values/base.

    Paired by round, so a slow stretch of the machine hits both sides of each ratio; the quartiles
    say how far one round's ratio swings, i.e. how large a difference the median can resolve."""
    ratios = [x / b for x, b in zip(values, base)]
    if len(ratios) < 2:
        return f"{ratios[0]:.3f}x"
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f}x ({q1:.3f}-{q3:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--markdown", help="append the result to this file")
    args = ap.parse_args()

    cfg = config.load(args.config, args.set + [f"train.precision={args.precision}"])
    device, t = torch.device(args.device), cfg.train
    n_micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        [
            torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen).to(device)
            for _ in range(n_micro)
        ]
        for _ in range(args.steps)
    ]

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    steps, skipped = {}, {}
    for name, build in PEERS.items():
        try:
            steps[name] = build(cfg, device, n_micro)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {e}"
    tokens = args.steps * t.global_batch_size * t.seq_len
    tps: dict[str, list[float]] = {name: [] for name in steps}
    memory: dict[str, float] = {}
    for round_ in range(args.rounds):
        # alternate the order: whoever runs first in a round meets a different machine state
        for name, step in list(steps.items())[:: 1 if round_ % 2 == 0 else -1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tps[name].append(tokens / time_steps(step, batches, autocast, device))
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
    peak = peak_flops(device)
    fpt = flops_per_token(cfg.model, t.seq_len)
    m = cfg.model
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"## Training throughput, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_train.py --config {args.config} "
        + " ".join(f"--set {s}" for s in args.set)
        + f" --device {args.device} --precision {args.precision} --steps {args.steps} --rounds {args.rounds}`",
        f"- machine: {platform.machine()}, {where}, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
        f"- model: {m.arch} L={m.num_layers} h={m.hidden_size} heads={m.num_heads}/{m.kv_heads} ffn={m.ffn_size} "
        f"vocab={m.vocab_size}; batch {t.global_batch_size} x {t.seq_len} ({n_micro} micro-batches); "
        f"{args.precision}; AdamW (torch fused) for all",
        "",
        "| implementation | tokens/s (median) | speed / megatronlite's in the same round: median (quartiles) "
        "| rounds | MFU | peak memory GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in tps.items():
        med = statistics.median(values)
        util = mfu(med, fpt, peak)
        util_text = "n/a" if util is None else f"{100 * util:.1f}%"
        mem_text = f"{memory[name]:.1f}" if name in memory else "n/a"
        rounds = ", ".join(f"{x:,.0f}" for x in values)
        lines.append(
            f"| {name} | {med:,.0f} | {paired_ratio(values, tps['megatronlite'])} | {rounds} | {util_text} "
            f"| {mem_text} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
