"""Training tokens/s (and MFU, peak memory on GPU) of megatronlite against its peers, in one run.

Peers: HF transformers' LlamaForCausalLM (sdpa attention) and, on CUDA, megatron-core's GPTModel
(Transformer Engine layer spec when TE imports, else its local spec with unfused attention, named
so in the table; no dropout, like the others) with every feature of megatronlite's model mapped as
`convert --to megatron` maps it and as many parameters, else skipped saying why. All train the same
random token batches with torch's AdamW (fused where the device has it), the same batch, sequence
length and precision (bf16 = autocast over fp32 weights for all). `--compile both` adds megatronlite
with each block under torch.compile (train.compile) as a row of its own.

On CPU all peers stay resident and alternate in rounds (first one, then the other first) so
machine load hits them alike; on CUDA one peer at a time is built, measured and freed, so a peer
that runs out of memory is a row saying so and the others still run. A peer that cannot run here
(megatron-core on CPU) is listed as skipped; one that fails is listed with its error and the
script exits 1 after writing the table.

    python bench/bench_train.py [--config configs/demo.yaml] [--device cpu|cuda] [--precision fp32|bf16]
        [--compile off|on|both] [--family llama|qwen3|mistral] [--steps 10] [--rounds 6] [--markdown FILE]

On a GPU, e.g.: `--config configs/models/llama-1b.yaml --set train.seq_len=4096
--set train.micro_batch_size=1 --set train.global_batch_size=2 --device cuda --precision bf16`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import emit

from megatronlite import config
from megatronlite.config import MoEConfig
from megatronlite.kernels import external
from megatronlite.models.counting import flops_per_token
from megatronlite.train.metrics import mfu, peak_flops
from megatronlite.train.trainer import run_options

Step = Callable[[list[torch.Tensor]], None]
# --family: the config's shapes with a family's features, what distinguishes its preset in configs/models/ kept at
# any size (Qwen3: q/k norms, a head size twice hidden / heads, tied embeddings; Mistral: rope theta 1e6 and, as
# Mistral 7B v0.1, a sliding window, here half the demo's sequence so it cuts)
FAMILY_SETS = {
    "llama": ["model.arch=llama"],
    "qwen3": ["model.arch=qwen3", "model.head_dim=64", "model.tie_embeddings=true"],
    "mistral": ["model.arch=mistral", "model.sliding_window=128"],
}


class PeerSkipped(Exception):
    """A peer that cannot run on this machine: listed as skipped, not as a failure."""


def dense_twin(cfg):
    """`cfg` with every MoE layer a dense MLP as wide as the experts a token goes to (top_k x expert width): the
    same active parameters per token, so the same model FLOPs."""
    m = cfg.model
    wide = m.moe.top_k * m.expert_ffn_size + m.moe.shared_expert_ffn_hidden_size
    model = dataclasses.replace(m, ffn_hidden_size=wide, moe=MoEConfig())
    return dataclasses.replace(cfg, model=model)


def megatronlite_step(cfg, device, n_micro, compiled: bool = False, dense: bool = False) -> Step:
    from megatronlite.models.gpt import GPTModel

    cfg = dense_twin(cfg) if dense else cfg
    from megatronlite.models.init import init_parameters
    from megatronlite.optim.adamw import build_adamw

    model = GPTModel(cfg.model, options=run_options(cfg, device)).to(device)
    init_parameters(model, cfg.model, seed=0)
    if compiled:  # as the trainer does with train.compile
        for block in model.layers.values():
            block.compile()
    opt, _ = build_adamw(dict(model.named_parameters()), cfg.optim, device)

    def step(micro_batches):
        for tokens in micro_batches:
            (model(tokens[:, :-1], tokens[:, 1:]) / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_architecture(m) -> str:
    """The transformers class of the same model: the one `convert --to hf` would write."""
    from megatronlite.convert.hf import family_for

    return family_for(m).ARCHITECTURE


def hf_step(cfg, device, n_micro) -> Step:
    import transformers

    from megatronlite.convert.hf import family_for

    m = cfg.model
    fields = {k: v for k, v in family_for(m).hf_config(m).items() if k not in ("architectures", "model_type")}
    cls = getattr(transformers, hf_architecture(m))
    with torch.device(device):  # initialised where it trains: a 1B model's init on one CPU thread takes long
        model = cls(cls.config_class(**fields, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)

    def step(micro_batches):
        for tokens in micro_batches:
            # HF shifts labels itself: the same seq_len predictions as the others, minus one
            (model(input_ids=tokens[:, 1:], labels=tokens[:, 1:]).loss / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def mcore_name() -> str:
    """The megatron-core row's name: which layer spec it runs (Transformer Engine's when TE imports)."""
    spec = "Transformer Engine spec" if external.available("te") else "local spec, unfused"
    return f"megatron-core GPTModel ({spec})"


def mcore_features(m) -> tuple[dict, dict]:
    """megatron-core's TransformerConfig and GPTModel arguments for `m`'s features, from the Megatron-LM args
    `convert --to megatron` writes (the mapping that makes the same model); what megatron-core cannot express
    skips the peer, since its row would time another model against megatronlite's FLOPs."""
    import torch.nn.functional as F

    from megatronlite.convert.megatron import feature_args, moe_args
    from megatronlite.errors import UserError

    try:
        a, moe = feature_args(m), moe_args(m)
    except UserError as e:
        raise PeerSkipped(f"not the same model in megatron-core: {e}") from None
    moe = {"num_moe_experts" if k == "num_experts" else k: v for k, v in moe.items()}
    transformer = dict(
        normalization=a["normalization"],
        layernorm_epsilon=a["norm_epsilon"],
        gated_linear_unit=a["swiglu"],
        # Megatron-LM's --openai-gelu: GELU's tanh approximation, here torch's one kernel of it
        activation_func=F.silu if a["swiglu"] else functools.partial(F.gelu, approximate="tanh"),
        add_bias_linear=a["add_bias_linear"],
        add_qkv_bias=a["add_qkv_bias"],
        qk_layernorm=a["qk_layernorm"],
        window_size=a["window_size"],
        **moe,
    )
    model = dict(
        position_embedding_type=a["position_embedding_type"],
        rotary_base=a["rotary_base"],
        rope_scaling=a["use_rope_scaling"],
        rope_scaling_factor=a.get("rope_scaling_factor", 8.0),
        share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"],
    )
    return transformer, model


def megatronlite_parameter_count(m) -> int:
    """Parameters of megatronlite's model of `m` as built (padded vocabulary, tied weights once), on meta."""
    from megatronlite.models.gpt import GPTModel

    with torch.device("meta"):
        return sum(p.numel() for p in GPTModel(m).parameters())


def mcore_model(cfg, device):
    """megatron-core's GPTModel of `cfg.model` (`mcore_features`, the vocabulary padded as megatronlite pads it),
    TP = PP = 1 in a one-process group, no dropout; fp32 weights (autocast casts them, as for the others). Skipped
    unless it has as many parameters as megatronlite's model: a feature left out would show there."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = cfg.model
    transformer, model_args = mcore_features(m)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29599")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tc = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_size,
        ffn_hidden_size=m.ffn_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=cfg.train.precision == "bf16",
        params_dtype=torch.float32,
        **transformer,
    )
    # the normalization passed on: else the local spec takes apex's LayerNorm-only kernel when apex is present
    spec = gpt_layer_specs.get_gpt_decoder_block_spec(tc, external.available("te"), normalization=tc.normalization)
    model = GPTModel(tc, spec, vocab_size=m.padded_vocab_size(), max_sequence_length=m.max_seq_len, **model_args)
    model.to(device)
    theirs, ours = sum(p.numel() for p in model.parameters()), megatronlite_parameter_count(m)
    if theirs != ours:
        raise PeerSkipped(f"not the same model: {theirs:,} parameters against megatronlite's {ours:,}")
    return model


def mcore_loss(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of megatron-core's GPTModel on `tokens` (seq_len + 1 long), `positions` [1, seq_len]."""
    ids = tokens[:, :-1]
    return model(ids, positions.expand_as(ids), None, labels=tokens[:, 1:]).mean()


def mcore_step(cfg, device, n_micro) -> Step:
    """megatron-core's GPTModel (`mcore_model`) trained by torch's fused AdamW; CUDA only: its layers ask CUDA
    for the device, the RNG and the causal mask (tests/test_gpu_check.py runs them on CPU behind shims)."""
    if device.type != "cuda":
        raise PeerSkipped("megatron-core's layers need CUDA")
    model = mcore_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    positions = torch.arange(cfg.train.seq_len, device=device)[None]

    def step(micro_batches):
        for tokens in micro_batches:
            (mcore_loss(model, tokens, positions) / n_micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peers(compile_mode: str, model) -> dict[str, Callable[..., Step]]:
    """Row name -> builder, megatronlite first (the base of the speed ratios)."""
    out: dict[str, Callable[..., Step]] = {}
    if compile_mode in ("off", "both"):
        out["megatronlite"] = megatronlite_step
    if compile_mode in ("on", "both"):
        out["megatronlite (torch.compile)"] = functools.partial(megatronlite_step, compiled=True)
    out[f"HF {hf_architecture(model)} (sdpa)"] = hf_step
    if model.moe.num_experts:
        out["megatronlite, dense MLP of the same active width"] = functools.partial(megatronlite_step, dense=True)
    out[mcore_name()] = mcore_step
    return out


def time_steps(step: Step, batches, autocast, device) -> float:
    """Seconds for one optimizer step per batch, after one warm-up step.

    One autocast region per step, as the Trainer opens: autocast caches its bf16 casts of the weights
    until the region ends, so a region across steps would run later steps on stale, uncounted casts."""

    def one(b) -> None:
        with autocast():
            step(b)

    one(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        one(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_ratio(values: list[float], base: list[float]) -> str:
    """Median and quartiles of the per-round ratios values/base.

    Paired by round, so a slow stretch of the machine hits both sides of each ratio; the quartiles
    say how far one round's ratio swings, i.e. how large a difference the median can resolve."""
    ratios = [x / b for x, b in zip(values, base)]
    if not ratios:
        return "n/a"
    if len(ratios) < 2:
        return f"{ratios[0]:.3f}x"
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f}x ({q1:.3f}-{q3:.3f})"


def error_text(e: BaseException) -> str:
    """One short line for a table cell (an out-of-memory message runs over several lines)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}".replace("|", "/")


def measure(builders, cfg, device, n_micro, batches, autocast, rounds, failed) -> tuple[dict, dict, dict]:
    """Build `builders`, time them in alternating rounds, free them: (tokens/s per round, peak GiB, skipped).

    A peer that fails to build or to step goes into `failed` and leaves the rounds; the others go on."""
    steps, skipped = {}, {}
    for name, build in builders.items():
        try:
            steps[name] = build(cfg, device, n_micro)
        except PeerSkipped as e:
            skipped[name] = str(e)
        except Exception as e:  # noqa: BLE001 - an out-of-memory peer is a row of the table, not the end
            failed[name] = error_text(e)
    tokens = len(batches) * cfg.train.global_batch_size * cfg.train.seq_len
    tps: dict[str, list[float]] = {name: [] for name in steps}
    memory: dict[str, float] = {}
    for round_ in range(rounds):
        # alternate the order: whoever runs first in a round meets a different machine state
        for name in list(steps)[:: 1 if round_ % 2 == 0 else -1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                tps[name].append(tokens / time_steps(steps[name], batches, autocast, device))
            except Exception as e:  # noqa: BLE001
                failed[name] = error_text(e)
                del steps[name], tps[name]
                continue
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
            # as it goes: a run killed by its time limit still shows what it measured (gpu_check keeps the tail)
            print(f"bench_train: {name}, round {round_ + 1}: {tps[name][-1]:,.0f} tokens/s", flush=True)
    steps.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tps, memory, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--compile", default="off", choices=("off", "on", "both"), help="megatronlite's blocks compiled")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--markdown", help="append the result to this file")
    ap.add_argument("--family", choices=sorted(FAMILY_SETS), help="the config's model made that family's (below)")
    args = ap.parse_args()

    family = FAMILY_SETS.get(args.family, [])
    cfg = config.load(args.config, family + args.set + [f"train.precision={args.precision}"])
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

    builders = peers(args.compile, cfg.model)
    # CPU: all resident, rounds alternate between them; CUDA: one peer in memory at a time
    groups = [builders] if device.type == "cpu" else [{name: b} for name, b in builders.items()]
    tps: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for group in groups:
        got_tps, got_memory, got_skipped = measure(group, cfg, device, n_micro, batches, autocast, args.rounds, failed)
        tps.update(got_tps)
        memory.update(got_memory)
        skipped.update(got_skipped)
    peak = peak_flops(device, args.precision)
    fpt = flops_per_token(cfg.model, t.seq_len)
    m = cfg.model
    base_name = next(iter(builders))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    how = "all resident, alternating in rounds" if device.type == "cpu" else "one peer in memory at a time"
    lines = [
        f"## Training throughput, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_train.py --config {args.config} "
        + (f" --family {args.family}" if args.family else "")
        + "".join(f" --set {s}" for s in args.set)
        + f" --device {args.device} --precision {args.precision} --compile {args.compile}"
        f" --steps {args.steps} --rounds {args.rounds}`",
        f"- machine: {platform.machine()}, {where}, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
        f"- model: {m.arch} L={m.num_layers} h={m.hidden_size} heads={m.num_heads}/{m.kv_heads} ffn={m.ffn_size} "
        f"vocab={m.vocab_size}; batch {t.global_batch_size} x {t.seq_len} ({n_micro} micro-batches); "
        f"{args.precision}; AdamW (torch fused) for all; {how}",
        "",
        f"| implementation | tokens/s (median) | speed / {base_name}'s, paired by round: median (quartiles) "
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
            f"| {name} | {med:,.0f} | {paired_ratio(values, tps.get(base_name, []))} | {rounds} | {util_text} "
            f"| {mem_text} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    for name, why in failed.items():
        lines.append(f"| {name} | failed: {why} | | | | |")
    emit("\n".join(lines), args.markdown)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
