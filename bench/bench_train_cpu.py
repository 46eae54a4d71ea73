"""Training tokens/s on CPU: megatronlite's demo model against the same-shaped HF LlamaForCausalLM.

Both train on the same random token batches with torch's AdamW (fused where the device has it),
fp32, the same batch and sequence length, alternating in rounds so machine load hits both alike.

    python bench/bench_train_cpu.py [--steps 20] [--rounds 3] [--markdown bench/results/train_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from megatronlite import config
from megatronlite.models.gpt import GPTModel
from megatronlite.models.init import init_parameters
from megatronlite.optim.adamw import build_adamw


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def time_steps(step, batches) -> float:
    """Seconds for one optimizer step per batch, after one warm-up step."""
    step(batches[0])
    start = time.perf_counter()
    for b in batches:
        step(b)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", help="append the result to this file")
    args = ap.parse_args()

    cfg = config.load(args.config)
    t = cfg.train
    n_micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen)
         for _ in range(n_micro)]
        for _ in range(args.steps)
    ]

    ours = GPTModel(cfg.model)
    init_parameters(ours, cfg.model, seed=0)
    ours_opt, impl = build_adamw(dict(ours.named_parameters()), cfg.optim)

    def ours_step(micro_batches):
        for tokens in micro_batches:
            (ours(tokens[:, :-1], tokens[:, 1:]).mean() / n_micro).backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    hf = hf_llama(cfg)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.optim.lr, fused=impl.endswith("(fused)"))

    def hf_step(micro_batches):
        for tokens in micro_batches:
            (hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss / n_micro).backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    tokens = args.steps * t.global_batch_size * t.seq_len
    ours_tps, hf_tps = [], []
    for _ in range(args.rounds):
        ours_tps.append(tokens / time_steps(ours_step, batches))
        hf_tps.append(tokens / time_steps(hf_step, batches))
    o, h = statistics.median(ours_tps), statistics.median(hf_tps)
    m = cfg.model
    lines = [
        f"## CPU training throughput, {datetime.date.today()}",
        "",
        f"- command: `python bench/bench_train_cpu.py --config {args.config} --steps {args.steps} "
        f"--rounds {args.rounds}`",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        f"- model: {m.arch} L={m.num_layers} h={m.hidden_size} heads={m.num_heads}/{m.kv_heads} ffn={m.ffn_size} "
        f"vocab={m.vocab_size}; batch {t.global_batch_size} x {t.seq_len} ({n_micro} micro-batches); fp32; "
        f"optimizer {impl} for both",
        "",
        "| implementation | tokens/s (median of rounds) | rounds |",
        "|---|---|---|",
        f"| megatronlite | {o:,.0f} | {', '.join(f'{x:,.0f}' for x in ours_tps)} |",
        f"| HF LlamaForCausalLM (sdpa) | {h:,.0f} | {', '.join(f'{x:,.0f}' for x in hf_tps)} |",
        "",
        f"ratio megatronlite / HF: **{o / h:.2f}x**",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
