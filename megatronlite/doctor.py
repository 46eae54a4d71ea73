"""`megatronlite doctor`: what this machine has, the first thing to paste into a bug report.

Versions of Python, torch (its CUDA and NCCL), megatron-core and every optional backend, the GPUs,
which kernel `auto` picks for each op here, and whether a Slurm controller answers. Every probe
reports what it found or why not; none of them stops the report.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess

OPTIONAL = (  # distribution name, what megatronlite uses it for
    ("megatron-core", "data format, Megatron conversion"),
    ("transformers", "HF conversion, --verify"),
    ("safetensors", "HF conversion"),
    ("tokenizers", "tokenizer.json, tokenizer train"),
    ("triton", "Triton kernels"),
    ("apex", "apex kernels (NVIDIA's, from source or the NGC container)"),
    ("transformer-engine", "Transformer Engine kernels"),
    ("deepspeed", "DeepSpeed engine"),
    ("wandb", "logging.wandb"),
    ("matplotlib", "sweep plots"),
    ("zstandard", ".zst inputs"),
)


def _version(dist: str) -> str:
    from megatronlite.version import installed

    return installed(dist) or "not installed"


def _torch_lines() -> list[str]:
    import torch

    lines = [f"torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
        lines.append(f"NCCL: {nccl}")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append("GPU: none visible (torch.cuda.is_available() is False)")
    lines.append(f"gloo: {'yes' if torch.distributed.is_gloo_available() else 'no'}")
    return lines


def _kernel_line() -> str:
    import torch

    from megatronlite import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "auto picks: " + kernels.summary("auto", device)


def _slurm_line() -> str:
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return "Slurm: no sinfo on PATH"
    try:
        done = subprocess.run([sinfo, "--noheader", "--format=%P %a %D %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "Slurm: sinfo did not answer in 10 s"
    if done.returncode != 0:
        return f"Slurm: sinfo failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}"
    partitions = "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip())
    return f"Slurm: reachable; partitions (name avail nodes state): {partitions or 'none'}"


def report() -> list[str]:
    lines = [
        f"megatronlite: {_version('megatronlite')}",
        f"python: {platform.python_version()} on {platform.platform()}",
        *_torch_lines(),
    ]
    lines += [f"{dist}: {_version(dist)}  [{use}]" for dist, use in OPTIONAL]
    lines += [_kernel_line(), _slurm_line()]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    print("\n".join(report()))
