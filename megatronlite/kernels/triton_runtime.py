"""The one place triton is imported (its interpreter switch is set by `megatronlite.kernels`).

Importing `megatronlite.kernels` never imports this module: triton is optional and takes about a
second to import. The dispatcher imports the `triton_*` kernel modules only when a triton backend
is chosen, and they import triton from here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grid_size", "num_warps", "tl", "triton"]


def grid_size(device: torch.device, work_items: int) -> int:
    """Programs for a loop-over-rows kernel: a few per GPU core, fewer under the interpreter."""
    if device.type == "cuda":
        return max(1, min(work_items, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(work_items, 4))


def num_warps(block: int) -> int:
    """Warps for a program holding `block` elements of a row: more for wide rows, to spread the registers."""
    return min(16, max(4, block // 512))
