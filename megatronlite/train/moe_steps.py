"""What a training step does for the mixture-of-experts layers beyond forward and backward: the auxiliary
losses' gradient scale, the aux-loss-free bias update, and the router metrics of a logged step.

Every rank joins the same collectives in the same order whether or not it holds MoE layers (a pipeline stage
may hold none), so nothing waits on a rank that skipped one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatronlite.config import Config
from megatronlite.models.moe import MoE, RouterStats, set_aux_loss_scale
from megatronlite.parallel.mesh import Mesh


def moe_layers(stages: list) -> dict[int, MoE]:
    """This rank's MoE layers by global layer id."""
    return {int(i): block.mlp for _, model in stages for i, block in model.layers.items() if isinstance(block.mlp, MoE)}


class MoESteps:
    def __init__(self, cfg: Config, mesh: Mesh, stages: list, device: torch.device) -> None:
        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.layers = moe_layers(stages)
        self.enabled = cfg.model.moe.num_experts > 0
        self.pending: dict[int, list[RouterStats]] = {}  # per layer, since the last logged step

    def before_step(self, micro_batches: int, loss_scale: float) -> None:
        """The auxiliary losses' gradient per micro-batch: the main loss's (divided by the micro-batches); the
        balance loss's running shares of the global scope start again."""
        set_aux_loss_scale(loss_scale / micro_batches)
        for layer in self.layers.values():
            layer.start_step()

    def after_step(self, stepped: bool) -> None:
        """Collect the step's router statistics; with aux-loss-free balancing and a step taken, move each layer's
        bias by the step's load over the whole batch (summed over every rank that saw tokens: DP x CP)."""
        if not self.enabled:
            return
        for i, layer in self.layers.items():
            stats = layer.take_stats()
            if stats is not None:
                self.pending.setdefault(i, []).append(stats)
        if not (self.cfg.model.moe.bias_update_rate and stepped):
            return
        loads = self._gathered(lambda stats: stats[-1].tokens_per_expert.float(), self.cfg.model.moe.num_experts)
        for i, layer in self.layers.items():
            layer.update_bias(loads[i])

    def record(self) -> dict:
        """(Every rank, at a logged step.) The router metrics since the last logged step: the balance and z
        losses (their values before the coefficients, mean over layers and micro-batches), each MoE layer's
        load imbalance (max / mean assignments per expert) and, with a capacity, the assignments dropped."""
        if not self.enabled:
            return {}
        e = self.cfg.model.moe.num_experts

        def summary(stats: list[RouterStats]) -> torch.Tensor:
            """[assignments per expert..., balance loss, z-loss, dropped, forwards], summed over the stats."""
            counts = sum(s.tokens_per_expert.float() for s in stats)
            totals = [sum(s.aux_loss for s in stats), sum(s.z_loss for s in stats), sum(s.dropped for s in stats)]
            forwards = counts.new_tensor([float(sum(s.forwards for s in stats))])
            return torch.cat([counts, torch.stack(totals).float(), forwards])

        table = self._gathered(summary, e + 4)
        self.pending = {}
        rows = torch.stack(list(table.values()))
        forwards = rows[:, e + 3].clamp(min=1)
        counts = rows[:, :e]
        imbalance = counts.max(1).values / counts.mean(1).clamp(min=1e-9)
        out = {
            "moe_aux_loss": (rows[:, e] / forwards).mean().item(),
            "moe_z_loss": (rows[:, e + 1] / forwards).mean().item(),
            "moe_load_imbalance": [round(x, 4) for x in imbalance.tolist()],
        }
        if self.cfg.model.moe.capacity_factor is not None:
            out["moe_dropped"] = int(rows[:, e + 2].sum().item())
        return out

    def _gathered(self, value, width: int) -> dict[int, torch.Tensor]:
        """{MoE layer id: `value`(its pending stats), summed over every rank} for every MoE layer of the model,
        in one all-reduce (a stage's layers are its own; DP, CP and sequence-parallel TP ranks saw different
        tokens)."""
        flags = self.cfg.model.moe.layers(self.cfg.model.num_layers)
        table = torch.zeros(len(flags), width, device=self.device)
        # TP ranks route the same tokens unless sequence parallelism gave each its own: count them once
        counted = self.mesh.tp_rank == 0 or self.cfg.parallel.sequence_parallel
        for i, stats in self.pending.items() if counted else ():
            table[i] = value(stats).to(self.device)
        if self.mesh.world_size > 1:
            dist.all_reduce(table)
        return {i: table[i] for i, moe in enumerate(flags) if moe}
