"""This data-parallel rank's micro-batches, step by step, from one global sample stream.

Optimizer step k reads global samples [c + k*G, c + (k+1)*G) (c: consumed samples at start, G: global
batch size; indices wrap modulo the dataset length only past its end). DP rank r takes the contiguous
share [r*G/D, (r+1)*G/D) of them, cut into micro-batches. The stream depends on neither D nor where a
run was resumed, so a run resumed with another DP size continues exactly where it left off.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from megatronlite.errors import UserError

_POLL_S = 0.1


class BatchLoader:
    """Iterate for a list of [micro_batch_size, seq_len+1] int64 tensors per optimizer step, prefetched."""

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(
                f"global batch size {global_batch_size} is not a multiple of micro batch size x data-parallel "
                f"size ({micro_batch_size} x {dp_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if len(dataset) == 0:
            raise UserError("the dataset has no samples; check data.split and data.sources")
        self.dataset = dataset
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.device, self.prefetch = torch.device(device), prefetch
        self._consumed = consumed_samples

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by the steps yielded so far (plus those consumed before a resume)."""
        return self._consumed

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def batch_at(self, consumed_samples: int) -> list[torch.Tensor]:
        """This rank's CPU micro-batches of the step that starts after `consumed_samples` global samples."""
        share = self.global_batch_size // self.dp_size
        first = consumed_samples + self.dp_rank * share
        micro_batches = []
        for m in range(self.num_micro_batches):
            start = first + m * self.micro_batch_size
            rows = [self.dataset[i % len(self.dataset)] for i in range(start, start + self.micro_batch_size)]
            micro_batches.append(torch.from_numpy(np.stack(rows)))
        return micro_batches

    def _produce(self, out: queue.Queue, stop: threading.Event, consumed: int) -> None:
        pin = self.device.type == "cuda"
        while not stop.is_set():
            try:
                item = self.batch_at(consumed)
                if pin:
                    item = [t.pin_memory() for t in item]
            except BaseException as e:  # handed to the consumer, which raises it in the training thread
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            consumed += self.global_batch_size

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(out, stop, self._consumed), daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                self._consumed += self.global_batch_size
                yield [t.to(self.device, non_blocking=True) for t in item]
        finally:
            stop.set()
            worker.join()
