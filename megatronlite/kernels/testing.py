"""Helpers for the kernel tests, kept in the package so every test module shares them (no pytest dependency)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# per dtype: what one rounding in a different order (or by truncation, as Triton's interpreter
# converts fp32 to bf16) can change, for values of order one
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


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
