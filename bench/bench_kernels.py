"""Kernel speed: each op's Triton kernel against the torch reference, eager and under torch.compile.

Run: python bench/bench_kernels.py [--size tiny|small|llama1b|llama8b] [--dtype fp32|bf16] [--iters 20]
                                   [--no-compile] [--no-triton]
                                   [--markdown bench/results/kernels_<device>.md]
Times are forward + backward (the AdamW row: one step over all tensors), median of --iters runs after
warm-up. The last column is the largest difference between the Triton and torch outputs, so the
table also shows the kernels agree. On a machine without a GPU Triton runs in its interpreter: use
--size tiny there; the numbers then only show that the script and the kernels work.

A second table sets each fused op against the plain torch code it replaces (the chunked output layer
+ loss against F.linear + F.cross_entropy on the full logits): time, peak memory on CUDA, and the
largest difference of the outputs. Its torch rows need no Triton, so CPU numbers mean something:
`--size small --no-triton --no-compile` on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatronlite import kernels
from megatronlite.kernels import reference
from megatronlite.kernels.dispatch import triton_problem

SIZES = {  # tokens (in sequences of seq), hidden, heads, head_dim, ffn, vocab, adam tensors of hidden x hidden
    "tiny": {"tokens": 64, "seq": 64, "hidden": 64, "heads": 4, "head_dim": 16, "ffn": 128, "vocab": 250, "tensors": 4},
    # a real vocabulary at CPU scale: the output-layer rows against plain torch mean something on CPU
    "small": {
        "tokens": 1024,
        "seq": 1024,
        "hidden": 256,
        "heads": 4,
        "head_dim": 64,
        "ffn": 1024,
        "vocab": 32000,
        "tensors": 4,
    },
    # Llama 3.2 1B (configs/models/llama-1b.yaml) at gpu_check's batch: one sequence of 4096
    "llama1b": {
        "tokens": 4096,
        "seq": 4096,
        "hidden": 2048,
        "heads": 32,
        "head_dim": 64,
        "ffn": 8192,
        "vocab": 128256,
        "tensors": 16,
    },
    "llama8b": {
        "tokens": 8192,
        "seq": 2048,
        "hidden": 4096,
        "heads": 32,
        "head_dim": 128,
        "ffn": 14336,
        "vocab": 128256,
        "tensors": 16,
    },
}


@dataclass
class Case:
    """One op: how to build its inputs, and its triton, torch and to-be-compiled torch callables."""

    name: str
    shape: str
    make: Callable[[], tuple]
    triton: Callable
    torch: Callable
    backward: bool = True
    plain: Callable | None = None  # the plain torch code the fused op replaces, if any


def _plain_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """What a model does without the fused loss: the full logits, then F.cross_entropy in fp32."""
    return F.cross_entropy(F.linear(hidden, weight)[:, :vocab_size].float(), target)


def _cases(size: dict, dtype: torch.dtype, device: str) -> list[Case]:
    t, h, ffn, vocab = size["tokens"], size["hidden"], size["ffn"], size["vocab"]
    heads, d, seq = size["heads"], size["head_dim"], size["seq"]

    def rand(*shape, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_(grad)

    def norm_inputs(bias: bool):
        return (rand(t, h), rand(h), rand(h)) if bias else (rand(t, h), rand(h))

    def rotary_inputs():
        q = rand(t // seq, seq, heads, d, grad=False).transpose(1, 2).requires_grad_()
        return q, torch.randn(seq, d, device=device), torch.randn(seq, d, device=device)

    padded = 128 * -(-vocab // 128)

    def ce_inputs():
        return rand(t, h), rand(padded, h, scale=0.02), torch.randint(0, vocab, (t,), device=device)

    def adamw_inputs():
        n = size["tensors"]
        model = [rand(h, h, grad=False) for _ in range(n)]
        masters = [p.float() for p in model]
        grads = [rand(h, h, grad=False) for _ in range(n)]
        moments = [torch.zeros(h, h, device=device) for _ in range(2 * n)]
        scalars = [reference.AdamWScalars(1e-3, 0.9, 0.95, 1e-8, 0.1, 10)] * n
        return masters, grads, moments[:n], moments[n:], model if dtype != torch.float32 else [None] * n, scalars

    def impl(fn, name):
        return functools.partial(fn, impl=name)

    def ce(name):
        return functools.partial(kernels.linear_cross_entropy, vocab_size=vocab, impl=name)

    def adamw_triton(*step_args):  # looked up on use: triton may be absent
        return kernels.dispatch.implementation("adamw", "triton", device)(*step_args)

    return [
        Case(
            "rms_norm",
            f"{t}x{h}",
            lambda: (*norm_inputs(False), 1e-5),
            impl(kernels.rms_norm, "triton"),
            reference.rms_norm,
        ),
        Case(
            "layer_norm",
            f"{t}x{h}",
            lambda: (*norm_inputs(True), 1e-5),
            impl(kernels.layer_norm, "triton"),
            reference.layer_norm,
        ),
        Case(
            "rotary",
            f"{t // seq}x{heads}x{seq}x{d}",
            rotary_inputs,
            impl(kernels.apply_rotary, "triton"),
            reference.apply_rotary,
        ),
        Case("swiglu", f"{t}x2*{ffn}", lambda: (rand(t, 2 * ffn),), impl(kernels.swiglu, "triton"), reference.swiglu),
        Case(
            "linear_cross_entropy",
            f"{t}x{h} @ {padded}x{h}",
            ce_inputs,
            ce("triton"),
            ce("torch"),
            plain=functools.partial(_plain_linear_cross_entropy, vocab_size=vocab),
        ),
        Case("adamw", f"{size['tensors']}x{h}x{h}", adamw_inputs, adamw_triton, reference.adamw_step, backward=False),
    ]


def _run(case: Case, fn: Callable, args: tuple):
    out = fn(*args)
    if case.backward:
        grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        torch.autograd.grad(out, grads, torch.ones_like(out))
    return out if case.backward else args[0]


def _median_ms(case: Case, fn: Callable, iters: int, device: str) -> float:
    args = case.make()
    for _ in range(2):
        _run(case, fn, args)
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _run(case, fn, args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _peak_mib(case: Case, fn: Callable, device: str) -> float:
    """Peak CUDA memory of one call beyond its inputs (the fused ops exist to keep this small)."""
    if device != "cuda":
        raise RuntimeError("peak memory is measured on CUDA only")
    args = case.make()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _run(case, fn, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _max_diff(case: Case, ours_fn: Callable | None = None, theirs_fn: Callable | None = None) -> float:
    torch.manual_seed(0)
    ours = _run(case, ours_fn or case.triton, case.make())
    torch.manual_seed(0)
    theirs = _run(case, theirs_fn or case.torch, case.make())
    pairs = zip(ours, theirs) if isinstance(ours, list) else [(ours, theirs)]
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


def _cell(fn: Callable[[], float], fmt: str) -> str:
    try:
        return format(fn(), fmt)
    except Exception as e:  # a backend that fails on this machine is a row entry, not a crash
        return f"failed ({type(e).__name__})"


def _against_plain(cases: list[Case], iters: int, device: str, skip: str | None) -> list[str]:
    """The second table (see the module doc): every fused op's backends, then the plain code it replaces."""
    lines = [
        "",
        "| op | implementation | ms | peak MiB | max abs diff vs plain |",
        "|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for case in (c for c in cases if c.plain is not None):
        for name, fn in (("fused, triton", case.triton), ("fused, torch", case.torch), ("plain", case.plain)):
            if name == "fused, triton" and skip:
                lines.append(f"| {case.name} | {name} | {skip} | | |")
            else:
                ms = _cell(lambda c=case, f=fn: _median_ms(c, f, iters, device), ".3f")
                peak = "n/a" if device != "cuda" else _cell(lambda c=case, f=fn: _peak_mib(c, f, device), ".1f")
                diff = _cell(lambda c=case, f=fn: _max_diff(c, f, c.plain), ".2e")
                lines.append(f"| {case.name} | {name} | {ms} | {peak} | {diff} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: llama1b on GPU, tiny on CPU")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (slow to compile)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton rows (minutes in the interpreter)")
    parser.add_argument("--markdown", type=Path, help="also write the table here, e.g. bench/results/kernels_h100.md")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("llama1b" if device == "cuda" else "tiny")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    skip = "skipped (--no-triton)" if args.no_triton else triton_problem(device)
    machine = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    chosen = kernels.summary("auto" if skip else "triton", device)
    note = " (Triton's interpreter on CPU: timings are not meaningful)" if device == "cpu" and not skip else ""
    lines = [
        f"# Kernel benchmark: {machine}, {dtype}, size {size}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {chosen}{note}",
        "",
        "| op | shape | triton ms | torch ms | torch.compile ms | max abs diff triton vs torch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    cases = _cases(SIZES[size], dtype, device)
    for case in cases:
        triton_ms = skip or _cell(lambda c=case: _median_ms(c, c.triton, args.iters, device), ".3f")
        torch_ms = _cell(lambda c=case: _median_ms(c, c.torch, args.iters, device), ".3f")
        compiled = (
            "skipped"
            if args.no_compile
            else _cell(lambda c=case: _median_ms(c, torch.compile(c.torch), args.iters, device), ".3f")
        )
        diff = "n/a" if skip else _cell(lambda c=case: _max_diff(c), ".2e")
        lines.append(f"| {case.name} | {case.shape} | {triton_ms} | {torch_ms} | {compiled} | {diff} |")
        print(lines[-1], flush=True)
    lines += _against_plain(cases, args.iters, device, skip)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
