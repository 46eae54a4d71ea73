"""Helpers shared by the kernel tests and bench/bench_kernels.py (no pytest dependency)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatronlite.errors import UserError
from megatronlite.kernels.dispatch import resolve

# per dtype: what one rounding in a different order (or by truncation, as Triton's interpreter
# converts fp32 to bf16) can change, for values of order one
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def triton_skip_reason(device: str | torch.device = "cpu") -> str | None:
    """None when triton kernels can run on `device` here, else why not (for pytest.mark.skipif)."""
    try:
        resolve("swiglu", "triton", device)
    except UserError as e:
        return str(e)
    return None


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fill every floating tensor from torch.empty / torch.empty_like with NaN while active.

    The kernels allocate their outputs this way, so an element a kernel forgets to write stays NaN
    and fails the comparison instead of passing by luck with stale memory.
    """
    originals = torch.empty, torch.empty_like

    def poison(alloc):
        def wrapped(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return wrapped

    torch.empty, torch.empty_like = (poison(a) for a in originals)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = originals
