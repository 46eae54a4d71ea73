"""The constants the planner assumes: per-GPU peak and bandwidths, the memory allowance, the efficiency.

Every number is a published datasheet figure or a stated assumption; `plan --calibrate` replaces the
efficiency with one fitted to a finished run (stored in CALIBRATION_FILE, read back here).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatronlite.errors import UserError
from megatronlite.train.metrics import PEAK_BF16_FLOPS

GB = 1e9
GIB = 2**30


def _peak(name: str) -> float:
    """Dense bf16 peak from the table MFU uses (train/metrics.py): plan and train report the same MFU for a bf16 run
    (the planner plans bf16; a run in fp32 is measured against its TF32 peak)."""
    return dict(PEAK_BF16_FLOPS)[name]


@dataclass(frozen=True)
class GPU:
    peak_flops: float  # dense bf16, FLOP/s
    memory: float  # bytes
    hbm: float  # memory bandwidth, bytes/s (the optimizer step is bound by it)
    intra_node: float  # NVLink / Infinity Fabric bus bandwidth per GPU a ring collective achieves, bytes/s
    inter_node: float  # network bandwidth per GPU (one NIC per GPU), bytes/s
    latency: float = 10e-6  # seconds per collective or send, whatever its size (NCCL small-message latency)


# Sources: NVIDIA A100/H100/H200/B200 and AMD MI300X datasheets (peak, memory, HBM, NVLink/IF per GPU);
# NIC: one 200 Gb/s HDR (A100 DGX) or 400 Gb/s NDR/XDR-class (H100, H200, B200, MI300X systems) port per GPU.
# Collectives reach about 80% of the link figure (nccl-tests bus bandwidth on DGX systems), applied here.
_LINK_EFFICIENCY = 0.8
GPUS: dict[str, GPU] = {
    "a100": GPU(_peak("A100"), 80 * GIB, 2.0e12, 300 * GB * _LINK_EFFICIENCY, 25 * GB * _LINK_EFFICIENCY),
    "h100": GPU(_peak("H100"), 80 * GIB, 3.35e12, 450 * GB * _LINK_EFFICIENCY, 50 * GB * _LINK_EFFICIENCY),
    "h200": GPU(_peak("H200"), 141 * GB, 4.8e12, 450 * GB * _LINK_EFFICIENCY, 50 * GB * _LINK_EFFICIENCY),
    "b200": GPU(_peak("B200"), 180 * GB, 8.0e12, 900 * GB * _LINK_EFFICIENCY, 50 * GB * _LINK_EFFICIENCY),
    # MI300X: 1307.4 TFLOP/s dense bf16; 7 Infinity Fabric links of 64 GB/s per direction to the other GPUs
    "mi300x": GPU(1307.4e12, 192 * GB, 5.3e12, 448 * GB * _LINK_EFFICIENCY, 50 * GB * _LINK_EFFICIENCY),
}

# Assumption (not yet measured on our GPUs): the share of the bf16 peak our matmuls reach in a training
# step, before communication and the bubble. Megatron-LM reports 52% MFU for GPT-3 175B on A100s
# (Narayanan et al. 2021, 163 of 312 TFLOP/s) including its communication; 0.55 of peak for compute alone.
DEFAULT_EFFICIENCY = 0.55


@dataclass(frozen=True)
class Allowance:
    context_bytes: int  # CUDA context, cuBLAS workspaces, NCCL buffers: outside PyTorch's allocator
    fragmentation: float  # the caching allocator's reserved-but-unused share, over everything allocated


# Assumption: about 1 GiB outside the allocator is typical of a torch + NCCL process on Hopper; 10% for
# fragmentation is the headroom Megatron users commonly leave.
ALLOWANCE = Allowance(context_bytes=1 * GIB, fragmentation=0.10)

CALIBRATION_FILE = Path(os.environ.get("MEGATRONLITE_PLAN_CALIBRATION", Path.home() / ".megatronlite" / "plan.json"))


def gpu(kind: str) -> GPU:
    if kind not in GPUS:
        raise UserError(f"--gpu {kind!r} is not one the planner knows; valid: {', '.join(GPUS)}")
    return GPUS[kind]


def efficiency(kind: str, path: Path | None = None) -> tuple[float, str]:
    """The matmul efficiency for `kind` and where it comes from (a calibration, or the default assumption)."""
    path = path or CALIBRATION_FILE
    if path.is_file():
        try:
            fitted = json.loads(path.read_text()).get(kind)
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}: not a planner calibration file (JSON {{gpu: {{efficiency, run}}}})") from None
        if fitted is not None:
            return float(fitted["efficiency"]), f"calibrated from {fitted['run']}"
    return DEFAULT_EFFICIENCY, "assumed, no calibration"
