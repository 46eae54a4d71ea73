"""Several datasets mixed by weight, in Megatron's deterministic interleave.

Global sample i comes from the source whose count lags furthest behind weight * i, so every prefix of
the stream follows the weights closely and the order depends on nothing but the weights. The greedy loop
is megatron-core's compiled `build_blending_indices`; it takes milliseconds, so the result is not cached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

SURPLUS = 0.005  # each source holds a little more than its share: megatron-core's mid_level_dataset_surplus


def normalize(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def source_sizes(weights: Sequence[float], size: int) -> list[int]:
    """How many samples each source must provide for a blend of `size` samples (megatron-core's rounding)."""
    return [math.ceil(math.ceil(w * size) * (1 + SURPLUS)) for w in normalize(weights)]


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each global sample, its index within that source)."""
    with warnings.catch_warnings():
        # importing megatron.core imports its optimizer and FSDP modules too, each warning that Transformer
        # Engine and Apex are absent: true on CPU and irrelevant to a compiled loop over sample indices
        warnings.filterwarnings("ignore", "Transformer Engine and Apex are not installed", UserWarning)
        from megatron.core.datasets import helpers_cpp

    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(source, sample, normalize(weights), len(weights), size, False)
    return source, sample


class BlendedDataset:
    """Sample i is datasets[source[i]][sample[i]]."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        self.datasets = list(datasets)
        self.source, self.sample = blending_indices(weights, size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.source[i]][self.sample[i]]
