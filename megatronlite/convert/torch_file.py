"""One consolidated `.pt`: the global state dict, weights only.

    {"format": "megatronlite.global", "config": <the run config as a plain dict>,
     "model": {global name: tensor}}

Names and shapes are those of a native checkpoint (`layers.0.mlp.fc1.weight.gate`, the
vocabulary unpadded), so the file loads anywhere with `torch.load(path, weights_only=True)`.
Reading memory-maps the file; writing parks tensors in memory-mapped files until `torch.save`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatronlite import config as config_mod
from megatronlite.checkpoint.weights import expected_shapes
from megatronlite.convert.mapping import Mapping, rename
from megatronlite.convert.model_state import Checkpoint, Options, from_store, output_dtype, tensors_only
from megatronlite.convert.parking import Staging
from megatronlite.errors import UserError
from megatronlite.untrusted import load_torch_file

FORMAT = "megatronlite.global"
KEYS = ("config", "model")


class _DictStore:
    def __init__(self, where: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.where, self.tensors = where, tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty_like(self.tensors[name], device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def read(path: Path, options: Options) -> Checkpoint:
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not all(isinstance(obj.get(k), dict) for k in KEYS):
        raise UserError(f"{path}: not a megatronlite global state dict (a dict with format {FORMAT!r}, config, model)")
    cfg = config_mod.from_dict(obj["config"])
    mapping = Mapping([rename(n, n) for n in expected_shapes(cfg)])
    return from_store(cfg, _DictStore(path, tensors_only(obj["model"], path, "model")), mapping, lambda name: False)


def write(ckpt: Checkpoint, dst: Path, options: Options) -> None:
    dtype = output_dtype(ckpt, options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Staging(dst.parent) as staging:
        model = {name: staging.put(ckpt.get(name).to(dtype)) for name in expected_shapes(ckpt.cfg)}
        torch.save({"format": FORMAT, "config": ckpt.cfg.to_dict(), "model": model}, dst)
