"""Weights & Biases logging that can never stop training.

`logging.wandb: {mode: disabled|offline|online, project, entity, group, name}`. Only the logging
rank opens a run. Any wandb failure (not installed, no network, no API key) warns once and
turns the logger off; the metrics.jsonl file is the record that always exists.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from megatronlite.extras import require


class WandbLogger:
    def __init__(self, settings: dict, config: dict, run_dir: Path, default_name: str) -> None:
        self.run = None
        try:
            wandb = require("wandb", "wandb", "logging.wandb")
            self.run = wandb.init(
                mode=settings.get("mode", "offline"),
                project=settings.get("project", "megatronlite"),
                entity=settings.get("entity"),
                group=settings.get("group"),
                name=settings.get("name", default_name),
                dir=str(run_dir),
                config=config,
            )
            # charts over the training step, which goes back on a spike rewind: wandb's own step only goes up
            # (it drops a row logged at an earlier one), so it stays its counter and `step` is a field
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            self._disable(e)

    def _disable(self, error: Exception) -> None:
        warnings.warn(f"wandb disabled: {type(error).__name__}: {error}", stacklevel=3)
        self.run = None

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if v is not None})
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._disable(e)


def open_wandb(settings: dict | None, config: dict, run_dir: Path, name: str) -> WandbLogger | None:
    if not settings or settings.get("mode", "offline") == "disabled":
        return None
    return WandbLogger(settings, config, run_dir, name)
