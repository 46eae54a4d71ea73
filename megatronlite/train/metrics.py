"""Throughput, MFU against a table of peak FLOP/s, and the run's metrics.jsonl and console line.

MFU = achieved model FLOP/s / peak FLOP/s, where achieved = tokens/s x flops_per_token (see
megatronlite.models.counting) per GPU. Peaks are dense (no sparsity) tensor-core numbers from the
vendors' datasheets, of the precision the matmuls run in: bf16 and fp16 the table's, fp32 in TF32
half of it (every GPU with TF32 has half its bf16 rate). fp32 without TF32, or a device not in the
table, gets MFU null and one warning: a guessed peak would make the number meaningless.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

# dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16: V100 has no bf16 (nor TF32)
)


def peak_flops(device: torch.device, precision: str = "bf16", tf32: bool = True) -> float | None:
    """The peak FLOP/s of `device` for matmuls in `precision` (fp32: in TF32 when `tf32`), or None (with one
    warning) when the table has none."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)
    if peak is None:
        warnings.warn(f"MFU is reported as null: no peak FLOP/s known for GPU {name!r}", stacklevel=2)
        return None
    if precision != "fp32":
        return peak
    if tf32 and torch.cuda.get_device_capability(device)[0] >= 8:
        return peak / 2
    warnings.warn(f"MFU is reported as null: no fp32 peak without TF32 in the table for GPU {name!r}", stacklevel=2)
    return None


def mfu(tokens_per_sec_per_gpu: float, flops_per_token: int, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_sec_per_gpu * flops_per_token / peak


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl (only the logging rank makes one)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        """Non-finite numbers (an fp16 overflow's grad norm) become null: strict JSON has no inf or NaN."""
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(finite, allow_nan=False) + "\n")

    def close(self) -> None:
        self.file.close()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after `step`: a run resumed from the checkpoint of
    `step` logs those steps again, and each step must appear once. A line that is not a whole record (the
    torn last write of a killed run) goes too. Atomic: a crash leaves the old file or the new one."""
    if not path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(path, errors="replace") as src, open(tmp, "w") as dst:
        dst.writelines(line for line in src if (n := _record_step(line)) is not None and n <= step)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None when the line is not a complete record."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(rec: dict, total_steps: int, eta_s: float) -> str:
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"grad_norm {rec['grad_norm']:.3f}",
        f"{rec['tokens_per_sec']:,.0f} tok/s",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if "eval_loss" in rec:
        parts.append(f"eval_loss {rec['eval_loss']:.4f}")
    if "loss_scale" in rec:
        parts.append(f"loss_scale {rec['loss_scale']:g} ({rec['skipped_steps']} skipped)")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def print_line(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
