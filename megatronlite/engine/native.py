"""megatronlite's own engine: bucketed data parallelism with ZeRO 0-2 (parallel/data_parallel.py), the global
norm and clipping of optim/clip.py, and AdamW in the implementation `optim.impl` names (optim/adamw.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatronlite.checkpoint.views import ADAM_STATES, GlobalPiece, model_pieces, slice_pieces, stored_name
from megatronlite.config import Config
from megatronlite.optim.adamw import build_adamw
from megatronlite.optim.clip import clip_grads, global_grad_norm, owned_grads
from megatronlite.parallel.data_parallel import DataParallel
from megatronlite.parallel.mesh import Mesh


class NativeEngine:
    norm_before_step = True

    def __init__(
        self, cfg: Config, mesh: Mesh, stages: list, late_sync: dict, num_micro: int, device: torch.device
    ) -> None:
        self.cfg, self.mesh, self.device, self.late_sync = cfg, mesh, device, late_sync
        self.params = {name: p for _, model in stages for name, p in model.named_parameters()}
        p = cfg.parallel
        self.dp = DataParallel(
            self.params, mesh.role("grad"), num_micro, p.zero, p.bucket_mb, set(late_sync), mesh.role("expert_grad")
        )
        self.optimizer, self.description = build_adamw(self.dp.optimizer_params(self.params), cfg.optim, device)
        # torch's fused AdamW skips a whole update on the device when its `found_inf` flag is set (GradScaler's
        # hook): the trainer need not read a step's numbers on the host before stepping
        fused = type(self.optimizer) is torch.optim.AdamW and self.optimizer.defaults.get("fused")
        self.skips_on_device = bool(fused)
        self.local_squares = torch.zeros((), device=device)  # this rank's own, before the reductions

    def forward(self, model: torch.nn.Module, *inputs: object) -> torch.Tensor:
        return model(*inputs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def backward_scale(self) -> float:
        """1.0: fp16's loss scale is the trainer's, applied before `backward` (train/loss_scale.py)."""
        return 1.0

    def finish_grads(self) -> None:
        self.dp.finish(self._sum_late_grads)

    def _sum_late_grads(self) -> None:
        for name, groups in self.late_sync.items():
            for group in groups:
                dist.all_reduce(self.params[name].grad, group=group)

    def _stepped(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._stepped()]

    def grad_norm(self) -> torch.Tensor:
        """Over the gradients each rank's optimizer steps, with the groups over which each part's squares add up
        beyond TP and PP: ZeRO shards over their bucket's group; expert weights over the EP group too."""
        mesh, zero, params = self.mesh, self.cfg.parallel.zero >= 1, self._stepped()
        dense = [p for p in params if p.sharding.split("ep") is None]
        experts = [p for p in params if p.sharding.split("ep") is not None]
        parts = [(owned_grads(dense, mesh), [mesh.role("grad")] if zero else [])]
        if experts:
            groups = [mesh.role("expert")] + ([mesh.role("expert_grad")] if zero else [])
            parts.append((owned_grads(experts, mesh), groups))
        norm, self.local_squares = global_grad_norm(parts, mesh, self.device)
        return norm

    def step(self, lr: float, norm: torch.Tensor | None, skip: torch.Tensor | None = None) -> bool:
        """(The trainer's guards and loss scaler already decided that this step is taken, or leave it to `skip`.)"""
        clip_grads(self.grads(), norm, self.cfg.optim.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.found_inf = skip.float() if skip is not None else None
        self.optimizer.step()
        self.dp.gather_params()
        return True

    def zero_grads(self) -> None:
        self.dp.zero_grads()

    def weight_pieces(self, for_save: bool) -> list[GlobalPiece]:
        return model_pieces(self.params, self.mesh, for_save)

    def optimizer_pieces(self, for_save: bool) -> list[GlobalPiece]:
        """The Adam states of what this rank's optimizer steps (`DataParallel.owned_slices`): every parameter, or
        with ZeRO its flat slices, each a few boxes of the global tensors. So a save holds no gathered state and a
        load needs no scatter; the memory a save adds does not grow with DP."""
        ensure_optimizer_state(self.optimizer)
        out = []
        name_of = {id(p): n for n, p in self.params.items()}
        for key in ADAM_STATES:  # parameters are fp32: their own master weights
            for owned in self.dp.owned_slices():
                name = stored_name(name_of[id(owned.param)], owned.param.sharding, for_save)
                if name is None:
                    continue
                flat = self.optimizer.state[owned.shard][key].view(-1)
                shape = tuple(owned.param.shape)
                out += slice_pieces(f"optim.{key}.{name}", flat, owned.start, shape, owned.param.sharding, self.mesh)
        return out

    def weights_loaded(self) -> None:
        """The parameters are the weights: nothing to derive."""

    def set_optimizer_steps(self, steps: int) -> None:
        ensure_optimizer_state(self.optimizer)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state[p]["step"].fill_(float(steps))

    def state_values(self) -> dict:
        """None of its own: fp16's loss scale is the trainer's (train/loss_scale.py)."""
        return {}

    def restore_values(self, meta: dict) -> None:
        """Nothing saved, nothing to take back."""


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's lazily-made state (zeros) so it can be loaded into or saved before the first step."""
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(optimizer, "init_state"):  # optimizers that keep their state elsewhere (CPU offload)
                optimizer.init_state(p)
                continue
            state = optimizer.state[p]
            if not state:
                step_device = p.device if fused else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
