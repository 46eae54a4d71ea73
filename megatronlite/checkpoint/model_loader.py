"""`load_model`: the weights of a checkpoint as one plain nn.Module in this process."""

from __future__ import annotations

from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import model_pieces
from megatronlite.config import Config
from megatronlite.models.gpt import GPTModel
from megatronlite.parallel.mesh import Mesh


def load_config(step_dir: Path) -> Config:
    raw = config_mod.parse_yaml((step_dir / "config.yaml").read_text())
    return config_mod.from_dict(raw)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPTModel:
    """The model of a checkpoint (a run directory, its `checkpoints/` or one step directory).

    `model(input_ids)` returns logits [batch, seq, vocab]; `model.cfg` is the model config and
    `model.run_config` the run's whole resolved config.
    """
    step_dir = store.find_step_dir(path)
    store.read_meta(step_dir)
    cfg = load_config(step_dir)
    model = GPTModel(cfg.model)
    pieces = model_pieces(dict(model.named_parameters()), Mesh(), for_save=False)
    store.check_shapes(step_dir, {p.key: p.global_shape for p in pieces})
    store.read_shards(step_dir, {}, pieces)
    model.run_config = cfg
    return model.to(device).eval()
