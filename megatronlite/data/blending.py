"""Several datasets mixed by weight, in Megatron's deterministic interleave.

Global sample i comes from the source whose count lags furthest behind weight * i, so every prefix of
the stream follows the weights closely and the order depends on nothing but the weights. A blend asked
for n samples holds ceil(weight * n) from each source (their sum, a few more than n) and builds each
source's dataset a little larger still (the surplus), as megatron-core's builder does. The greedy loop
is megatron-core's compiled `build_blending_indices`; it takes milliseconds, so the result is not cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatronlite.data.megatron_helpers import helpers_cpp
from megatronlite.errors import UserError

SURPLUS = 0.005  # each source holds a little more than its share: megatron-core's mid_level_dataset_surplus


def normalize(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def target_sizes(weights: Sequence[float], size: int) -> list[int]:
    """How many samples each source contributes to a blend of `size` samples: ceil(weight * size)."""
    return [math.ceil(w * size) for w in normalize(weights)]


def blend_size(weights: Sequence[float], size: int) -> int:
    """The length of a blend asked for `size` samples: what its sources contribute, at least `size`."""
    return sum(target_sizes(weights, size))


def source_sizes(weights: Sequence[float], size: int) -> list[int]:
    """How many samples each source's dataset is built for (megatron-core's rounding, with the surplus)."""
    return [math.ceil(t * (1 + SURPLUS)) for t in target_sizes(weights, size)]


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each global sample, its index within that source)."""
    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    # normalised twice, as megatron-core's builder and then its BlendedDataset each normalise: the second
    # division can move a weight's last bit, and that can break a tie of the greedy loop the other way
    twice = normalize(normalize(weights))
    helpers_cpp().build_blending_indices(source, sample, twice, len(weights), size, False)
    return source, sample


class BlendedDataset:
    """Sample i is datasets[source[i]][sample[i]]."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        self.datasets, self.weights = list(datasets), normalize(weights)
        self.source, self.sample = blending_indices(weights, size)
        drawn = np.bincount(self.source, minlength=len(self.datasets))
        for k, (dataset, n) in enumerate(zip(self.datasets, drawn.tolist())):
            if n > len(dataset):  # megatron-core refuses it too; its surplus is there to keep this from happening
                raise UserError(f"the blend takes {n} samples from source {k}, which has only {len(dataset)}")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.source[i]][self.sample[i]]
