"""What a run reports each logged step: metrics.jsonl, the console line, wandb and TensorBoard (logging rank only)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from megatronlite.config import Config
from megatronlite.models.counting import flops_per_token
from megatronlite.optim.schedules import lr_at
from megatronlite.parallel.mesh import Mesh
from megatronlite.train.metrics import MetricsWriter, console_line, drop_records_after, mfu, peak_flops, print_line
from megatronlite.train.tensorboard_logger import TensorBoardLogger
from megatronlite.train.wandb_logger import open_wandb

clock = time.perf_counter  # the run's stopwatch (a test's fake clock replaces it)


def _open_metrics(path: Path, start_step: int | None) -> MetricsWriter:
    if start_step is not None:
        drop_records_after(path, start_step)
    return MetricsWriter(path)


class RunLog:
    def __init__(
        self, cfg: Config, run_dir: Path, mesh: Mesh, device: torch.device, start_step: int | None = None
    ) -> None:
        """`start_step`: the step the run starts from (a resumed checkpoint's, or 0); the records of later
        steps, left by the run that got further before it stopped, are dropped. None keeps every record."""
        self.cfg, self.mesh, self.path = cfg, mesh, run_dir / "metrics.jsonl"
        self.writer = _open_metrics(self.path, start_step) if mesh.is_logging_rank else None
        self.wandb = open_wandb(cfg.logging.wandb, cfg.to_dict(), run_dir, cfg.name) if self.writer else None
        self.tensorboard = TensorBoardLogger(run_dir, start_step) if self.writer and cfg.logging.tensorboard else None
        self.device, self.peak = device, peak_flops(device, cfg.train.precision, cfg.train.tf32)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.start = self.last = clock()
        self.steps_since = 0

    def due(self, step: int, eval_loss: float | None) -> bool:
        """Whether `step` gets a record: every `logging.interval` steps, an evaluated step, the last step."""
        return not step % self.cfg.logging.interval or eval_loss is not None or step == self.cfg.train.steps

    def step_done(
        self, step: int, loss: float, grad_norm: float, consumed: int, eval_loss: float | None, extra: dict
    ) -> None:
        """Count a finished step; write a record when one is due (interval, eval, or the last step).

        `extra`: more keys for the record (fp16: the loss scale and the steps skipped for overflow)."""
        self.steps_since += 1
        total = self.cfg.train.steps
        if not self.due(step, eval_loss):
            return
        now = clock()
        tps = self.steps_since * self.tokens_per_step / (now - self.last)
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, self.cfg.optim, total),
            "grad_norm": grad_norm,
            "tokens_per_sec": tps,
            "consumed_samples": consumed,
            "elapsed_s": now - self.start,
            "mfu": mfu(tps / self.mesh.world_size, self.flops_per_token, self.peak),
        }
        if eval_loss is not None:
            rec["eval_loss"] = eval_loss
        rec.update(extra)
        if self.writer:
            self.writer.write(rec)
            eta = (total - step) * (now - self.last) / self.steps_since
            print_line(console_line(rec, total, eta))
        if self.wandb:
            self.wandb.log(rec)
        if self.tensorboard:
            self.tensorboard.log(rec)
        self.last, self.steps_since = now, 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an evaluation, a checkpoint save) out of the interval's tokens/s and MFU, as
        Megatron does; the device's queued training work is waited for first, so it stays in the interval."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = clock()
        try:
            yield
        finally:
            self.last += clock() - start

    def rewind(self, step: int) -> None:
        """Training went back to `step` (a loss-spike rewind): the records after it go, as on a resume."""
        if self.writer:
            self.writer.close()
            self.writer = _open_metrics(self.path, step)
        if self.tensorboard:
            self.tensorboard.start(step)
        self.last, self.steps_since = clock(), 0

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
        if self.tensorboard:
            self.tensorboard.close()
