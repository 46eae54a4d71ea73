"""TensorBoard event files of the same scalars as metrics.jsonl (`logging.tensorboard: true`).

Written by the logging rank into RUN_DIR/tensorboard; `tensorboard --logdir runs/` compares runs.
Like wandb, it can never stop training: a missing `tensorboard` package or a failing write warns
once and turns it off; metrics.jsonl is the record that always exists.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from megatronlite.errors import UserError
from megatronlite.extras import require


class TensorBoardLogger:
    def __init__(self, run_dir: Path, start_step: int | None = None) -> None:
        """`start_step`: the step the run starts from; the scalars of later steps (a run that got further, then
        resumed from an earlier checkpoint) are purged, as metrics.jsonl drops their records."""
        self.writer, self.log_dir = None, run_dir / "tensorboard"
        self.start(start_step)

    def start(self, step: int | None) -> None:
        """(Re)open the event files from `step` on: TensorBoard hides every event of a later step."""
        try:
            require("tensorboard", "tensorboard", "logging.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            if self.writer is not None:
                self.writer.close()
            purge = None if step is None else step + 1
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        except (UserError, OSError) as e:
            self._disable(e)

    def _disable(self, error: Exception) -> None:
        warnings.warn(f"tensorboard disabled: {error}", stacklevel=3)
        self.writer = None

    def log(self, record: dict) -> None:
        """Every finite number of the record but the step, as a scalar at that step."""
        if self.writer is None:
            return
        try:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, global_step=record["step"])
            self.writer.flush()
        except OSError as e:
            self._disable(e)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
