"""The training loop: one optimizer step = micro-batches forward/backward, grad sync, clip, step.

Everything that decides the numbers of a step is a function of (config, step, consumed
samples, checkpointed tensors), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatronlite import config as config_mod
from megatronlite.checkpoint.views import GlobalPiece, model_pieces, pieces_of
from megatronlite.config import Config
from megatronlite.data.dataset import build_datasets
from megatronlite.data.loader import BatchLoader
from megatronlite.data.tokenizers import build_tokenizer
from megatronlite.errors import UserError
from megatronlite.models.counting import flops_per_token
from megatronlite.models.gpt import GPTModel
from megatronlite.models.init import init_parameters
from megatronlite.optim.adamw import build_adamw
from megatronlite.optim.clip import clip_grads, global_grad_norm, owned_grads
from megatronlite.optim.schedules import lr_at
from megatronlite.parallel.data_parallel import reduce_gradients
from megatronlite.parallel.mesh import Mesh
from megatronlite.train import checkpointing
from megatronlite.train.metrics import MetricsWriter, console_line, mfu, peak_flops, print_line

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, mesh: Mesh, device: torch.device) -> None:
        self.cfg, self.run_dir, self.mesh, self.device = cfg, run_dir, mesh, device
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.num_micro = t.global_batch_size // (t.micro_batch_size * mesh.dp)
        self.model = GPTModel(
            cfg.model, mesh, sequence_parallel=cfg.parallel.sequence_parallel, recompute=t.recompute
        ).to(device)
        init_parameters(self.model, cfg.model, t.seed, mesh.tp_rank, mesh.tp)
        self.params = dict(self.model.named_parameters())
        self.optimizer, self.optim_impl = build_adamw(self.params, cfg.optim)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.optim.initial_loss_scale) if (
            t.precision == "fp16"
        ) else None
        self.step = 0
        self.consumed_samples = 0
        self._build_data()

    # --- data -------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}, data.tokenizer = {cfg.data.tokenizer})"
            )
        gb = cfg.train.global_batch_size
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data.sources,
            self.tokenizer,
            seq_len=cfg.train.seq_len,
            seed=cfg.train.seed,
            split=cfg.data.split,
            num_samples=(cfg.train.steps * gb, max(1, cfg.train.eval_iters) * gb),
            cache_dir=cfg.data.cache_dir,
            vocab_size=cfg.model.vocab_size,
        )

    def _loader(self, dataset, consumed: int) -> BatchLoader:
        t = self.cfg.train
        return BatchLoader(
            dataset, t.micro_batch_size, t.global_batch_size, self.mesh.dp_rank, self.mesh.dp, consumed, self.device
        )

    # --- one step ---------------------------------------------------------------------------
    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(tokens[:, :-1], tokens[:, 1:]).mean()

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        """Forward and backward every micro-batch, sync and clip gradients, step. Returns (loss, grad norm)."""
        total = torch.zeros((), device=self.device)
        for tokens in micro_batches:
            loss = self._micro_loss(tokens) / self.num_micro
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        reduce_gradients(self.params.values(), self.mesh)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = owned_grads(list(self.params.values()), self.mesh)
        norm = global_grad_norm(grads, self.mesh, self.device)
        clip_grads([p.grad for p in self.params.values() if p.grad is not None], norm, self.cfg.optim.clip_grad)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mesh.dp > 1:
            dist.all_reduce(total, group=self.mesh.dp_group)
            total /= self.mesh.dp
        return total.item(), norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        batches = iter(self._loader(self.valid_ds, 0))
        for _, micro_batches in zip(range(self.cfg.train.eval_iters), batches):
            losses.extend(self._micro_loss(tokens) for tokens in micro_batches)
        batches.close()
        self.model.train()
        loss = torch.stack(losses).mean()
        if self.mesh.dp > 1:
            dist.all_reduce(loss, group=self.mesh.dp_group)
            loss /= self.mesh.dp
        return loss.item()

    # --- checkpoints ------------------------------------------------------------------------
    def state_tensors(self, for_save: bool) -> dict[str, GlobalPiece]:
        """Model weights and Adam states as global pieces, keyed by global name."""
        out = model_pieces(self.params, self.mesh, for_save)
        checkpointing.ensure_optimizer_state(self.optimizer)
        for name, p in self.params.items():
            if p.shard.alias is not None:
                continue
            state = self.optimizer.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                out.update({f"optim.{key}.{k}": v for k, v in pieces_of(name, state[key], p.shard, self.mesh).items()})
        return out

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        checkpointing.maybe_resume(self)
        writer = MetricsWriter(self.run_dir / "metrics.jsonl") if mesh.is_logging_rank else None
        peak = peak_flops(self.device)
        fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        if mesh.rank == 0:
            print_line(
                f"megatronlite: {cfg.name} on {mesh.world_size} worker(s) "
                f"(tp={mesh.tp} pp={mesh.pp} dp={mesh.dp}), device {self.device}, "
                f"precision {cfg.train.precision}, optimizer {self.optim_impl}, from step {self.step}"
            )
        batches = iter(self._loader(self.train_ds, self.consumed_samples))
        start = last_log = time.perf_counter()
        steps_since_log = 0
        try:
            for micro_batches in batches:
                if self.step >= cfg.train.steps:
                    break
                loss, norm = self.train_step(micro_batches)
                self.step += 1
                self.consumed_samples += cfg.train.global_batch_size
                steps_since_log += 1
                eval_due = cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0
                eval_loss = self.evaluate() if eval_due else None
                if self.step % cfg.logging.interval == 0 or eval_due or self.step == cfg.train.steps:
                    now = time.perf_counter()
                    tps = steps_since_log * tokens_per_step / (now - last_log)
                    rec = {
                        "step": self.step,
                        "loss": loss,
                        "lr": lr_at(self.step - 1, cfg.optim, cfg.train.steps),
                        "grad_norm": norm,
                        "tokens_per_sec": tps,
                        "consumed_samples": self.consumed_samples,
                        "elapsed_s": now - start,
                        "mfu": mfu(tps / mesh.world_size, fpt, peak),
                    }
                    if eval_loss is not None:
                        rec["eval_loss"] = eval_loss
                    if writer:
                        writer.write(rec)
                        eta = (cfg.train.steps - self.step) * (now - last_log) / steps_since_log
                        print_line(console_line(rec, cfg.train.steps, eta))
                    last_log, steps_since_log = now, 0
                ckpt = cfg.checkpoint
                if ckpt.save and (
                    (ckpt.interval and self.step % ckpt.interval == 0) or self.step == cfg.train.steps
                ):
                    checkpointing.save(self)
        finally:
            batches.close()
            if writer:
                writer.close()

    def resolved_config_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)


def write_resolved_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, run_dir / "config.yaml")
