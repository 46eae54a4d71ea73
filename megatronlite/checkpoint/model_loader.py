"""`load_model`: the weights of a checkpoint as one plain nn.Module in this process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import model_pieces, router_bias_pieces
from megatronlite.config import Config
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel
from megatronlite.parallel.mesh import Mesh
from megatronlite.train.moe_steps import moe_layers

TokenIds = torch.Tensor | list


def load_config(step_dir: Path) -> Config:
    """The run config a checkpoint was saved with; a missing, unreadable or invalid one is one line naming it."""
    path = step_dir / "config.yaml"
    raw = config_mod.read_yaml(path, "checkpoint config")
    try:
        return config_mod.from_dict(raw)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def as_token_ids(ids: TokenIds, vocab_size: int, device: torch.device) -> torch.Tensor:
    """`ids` (a list, a list of lists, an integer tensor) as a LongTensor on `device`, checked against the vocabulary.

    The embedding would otherwise fail on a list, and on an out-of-range id without naming it.
    """
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()):
        raise TypeError(f"input_ids: token ids must be integers, got a {ids.dtype} tensor")
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"input_ids: expected [seq] or [batch, seq] token ids, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids: token id {low if low < 0 else high} is outside the vocabulary 0..{vocab_size - 1}"
        )
    return ids


class LoadedModel(GPTModel):
    """A whole model in one process that takes token ids as they come and, in eval mode, keeps no autograd graph.

    `model(ids)`: ids [seq] give logits [seq, vocab], ids [batch, seq] give [batch, seq, vocab]. After
    `model.train()` it is an ordinary GPTModel again as far as gradients go (fine-tuning, probing).
    """

    run_config: Config

    def forward(self, input_ids: TokenIds, labels: TokenIds | None = None) -> torch.Tensor:
        device = self.output_weight().device
        ids = as_token_ids(input_ids, self.cfg.vocab_size, device)
        batched = ids.dim() == 2
        if labels is not None:
            labels = as_token_ids(labels, self.cfg.vocab_size, device)
            labels = labels if batched else labels[None]
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            out = super().forward(ids if batched else ids[None], labels)
        return out if batched or labels is not None else out[0]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint (a run directory, its `checkpoints/` or one step directory), in eval mode.

    `model(input_ids)` returns logits over the tokenizer's vocabulary (see LoadedModel); `model.cfg` is
    the model config and `model.run_config` the run's whole resolved config (`data.tokenizer` made the ids).
    The vocabulary is not padded: padding exists for TP shards and GPU GEMM shapes, and one process needs
    neither, so `state_dict()` holds [vocab_size, hidden] embedding and output rows, as the checkpoint does.
    """
    step_dir = store.find_step_dir(path)
    store.read_meta(step_dir)
    cfg = load_config(step_dir)
    model = LoadedModel(dataclasses.replace(cfg.model, make_vocab_size_divisible_by=1))
    pieces = model_pieces(dict(model.named_parameters()), Mesh(), for_save=False)
    stored = store.stored_shapes(step_dir)  # a run trained with aux-loss-free balancing routes by its biases
    pieces += [p for p in router_bias_pieces(moe_layers([(None, model)])) if p.key in stored]
    store.check_shapes(step_dir, {p.key: p.global_shape for p in pieces})
    store.read_shards(step_dir, {}, pieces)
    model.run_config = cfg
    return model.to(device).eval()
