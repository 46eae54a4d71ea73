"""The training loop: one optimizer step = micro-batches forward/backward, grad sync, clip, step.

Everything that decides the numbers of a step is a function of (config, step, consumed
samples, checkpointed tensors), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megatronlite import config as config_mod
from megatronlite import kernels
from megatronlite.checkpoint import store
from megatronlite.checkpoint.views import GlobalPiece, router_bias_pieces
from megatronlite.config import Config
from megatronlite.data.documents import document_ids, document_positions
from megatronlite.data.loader import BatchLoader
from megatronlite.data.run import build_run_data, sample_order
from megatronlite.engine import build_engine
from megatronlite.models.gpt import Packing, RunOptions
from megatronlite.models.init import init_parameters
from megatronlite.models.moe import layout_warning as moe_layout_warning
from megatronlite.optim.loss_scale import LossScaler, from_deepspeed
from megatronlite.optim.schedules import lr_at
from megatronlite.parallel.context import split_sequence
from megatronlite.parallel.mesh import Mesh
from megatronlite.parallel.stages import build_stages, stage_layers
from megatronlite.train import checkpointing
from megatronlite.train.guards import (
    LossSpike,
    RewindBudget,
    SkipBudget,
    SpikeDetector,
    TrainingStopped,
    bad_ranks,
    grads_finite,
    local_flags,
)
from megatronlite.train.metrics import print_line
from megatronlite.train.moe_steps import MoESteps
from megatronlite.train.preemption import Preempted, PreemptionWatch
from megatronlite.train.restarts import record_restart, restart_count
from megatronlite.train.run_log import RunLog
from megatronlite.train.stateful import Stateful, all_pieces
from megatronlite.train.watchdog import Watchdog

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_options(cfg: Config, device: torch.device) -> RunOptions:
    """Kernels (resolved now, so a missing backend fails before training), recompute, SP."""
    choices = cfg.train.kernels
    resolved = kernels.resolve_all(choices, device)
    resolved["adamw"] = cfg.optim.impl if cfg.optim.impl in ("triton", "apex") else "torch"  # optim.impl decides
    if cfg.data.document_mask:  # positions differ per sample; the Triton kernel reads one table for the batch
        resolved["rotary"] = "torch"
    named = choices.get("linear_cross_entropy", "auto") if isinstance(choices, dict) else choices
    return RunOptions(
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.train.recompute,
        recompute_layers=cfg.train.recompute_layers,
        kernels=resolved,
        # auto takes the chunked loss only where it is the fast path (triton); naming a backend takes it anyway
        # (not under data.eod_mask_loss: the chunked loss has no per-token mask; validation refuses naming it then)
        fused_cross_entropy=(resolved["linear_cross_entropy"] == "triton" or named != "auto")
        and not cfg.data.eod_mask_loss,
        context_attention=cfg.parallel.context_attention,
        masked_loss=cfg.data.eod_mask_loss,
    )


def late_sync_groups(cfg: Config, mesh: Mesh, params: dict[str, torch.nn.Parameter]) -> dict[str, list]:
    """Gradients summed over other groups before the DP reduction, with every group each is partial in: SP norms
    and q/k norms over TP, a tied embedding over its first and last pipeline stage. (DataParallel reduces them
    in its last bucket, after these sums.)"""
    out: dict[str, list] = {}
    for name, param in params.items():
        for role in param.sharding.partial_grad:
            if mesh.role(role).size > 1:
                out.setdefault(name, []).append(mesh.role(role).pg)
    if cfg.model.tied and mesh.pp > 1:
        for name in ("embedding.word.weight", "output.weight"):
            if name in params:
                out.setdefault(name, []).append(mesh.embedding_group)
    return out


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, mesh: Mesh, device: torch.device) -> None:
        self.cfg, self.run_dir, self.mesh, self.device = cfg, run_dir, mesh, device
        resolve_precision(cfg, device)
        t, p = cfg.train, cfg.parallel
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.num_micro = config_mod.micro_batches(t, mesh.dp)
        self.options = run_options(cfg, device)
        self.stages = build_stages(cfg, mesh, self.options)
        self.params: dict[str, torch.nn.Parameter] = {}
        for _, model in self.stages:
            model.to(device)
            experts = mesh.role("expert")
            init_parameters(model, cfg.model, t.seed, mesh.tp_rank, mesh.tp, (experts.rank, experts.size))
            self.params.update(model.named_parameters())
            if t.compile:
                for block in model.layers.values():
                    block.compile()
        self.engine = build_engine(
            cfg, mesh, self.stages, late_sync_groups(cfg, mesh, self.params), self.num_micro, device
        )
        native_fp16 = t.precision == "fp16" and p.engine == "native"  # DeepSpeed scales fp16 losses itself
        self.scaler = LossScaler(cfg.optim.initial_loss_scale) if native_fp16 else None
        self.pipeline = None
        if mesh.pp > 1:
            from megatronlite.parallel.pipeline import PipelineRunner  # torch's pipelining: pipelined runs only

            n_stages = len(stage_layers(cfg))
            self.pipeline = PipelineRunner(
                self.stages, n_stages, mesh, p.schedule, self.num_micro, self._pipeline_loss, device
            )
        self.step = 0
        self.consumed_samples = 0
        self.nonfinite_skips = 0  # steps Adam did not take: train.on_nonfinite: skip, DeepSpeed's fp16 overflow
        self.adam_skips = 0  # steps Adam did not take, for any reason (fp16 overflows too): its bias correction
        self.skips = SkipBudget(t.max_skipped_steps)
        self.spikes = SpikeDetector(t.loss_spike_factor)
        self.rewinds = RewindBudget(t.max_skipped_steps)
        checkpointing.new_run_of_faults()
        self.beat = lambda phase: None  # the watchdog's, while `run` trains
        self.working = 0  # the step being trained, evaluated or saved
        self.moe = MoESteps(cfg, mesh, self.stages, device)
        # a step's numbers read on the host only when needed: where nothing must be decided on the host first
        # (fp16's scaler, spike detection and MoE's bias update decide on each step's numbers)
        self.deferred = (
            self.engine.skips_on_device
            and self.scaler is None
            and not t.loss_spike_factor
            and not cfg.model.moe.bias_update_rate
        )
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, [loss, non-finite, norm], local)
        self.reading = (float("nan"), float("nan"))  # the last step's (loss, grad norm) read on the host
        self._build_data()

    # --- data -------------------------------------------------------------------------------
    def _build_data(self) -> None:
        data = build_run_data(self.cfg)  # the same call `megatronlite data prebuild` makes
        self.tokenizer, self.train_ds, self.valid_ds = data.tokenizer, data.train, data.valid

    def _loader(self, dataset, consumed: int) -> BatchLoader:
        t = self.cfg.train
        batch = self.mesh.role("batch")
        return BatchLoader(
            dataset, t.micro_batch_size, t.global_batch_size, batch.rank, batch.size, consumed, self.device
        )

    # --- one step ---------------------------------------------------------------------------
    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_batch(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Packing | None]:
        """A block of [batch, seq + 1] tokens -> inputs, next-token labels (< 0: no loss) and the documents
        (data.document_mask); under CP this rank's two chunks of the inputs, labels and positions."""
        data, eod = self.cfg.data, self.tokenizer.eod_id
        context = self.mesh.role("context")

        def local(t: torch.Tensor) -> torch.Tensor:
            return split_sequence(t, 1, context.rank, context.size)

        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if data.eod_mask_loss:
            labels = labels.masked_fill(inputs == eod, -1)
        packing = None
        if data.document_mask:
            documents = document_ids(inputs, eod)
            packing = Packing(documents, local(document_positions(documents)))
        return local(inputs), local(labels), packing

    def _pipeline_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch (the model's own loss path), pre-divided for accumulation
        (and scaled for fp16)."""
        loss = self.stages[-1].model.loss(hidden, labels) / self.num_micro
        return loss * self.scaler.scale if self.scaler else loss

    def _forward_backward(self, micro_batches: list[torch.Tensor], train: bool) -> torch.Tensor:
        """The sum over micro-batches of loss / num_micro (meaningful on the last stage).

        One autocast region for the whole step: autocast keeps each fp32 weight's half-precision cast for the
        region, so a weight is cast once per step (the compute copy), not once per micro-batch and recompute.
        Backward runs with autocast off, as torch asks, inside the region (which keeps the copies)."""
        with self._autocast():
            if self.pipeline is not None:
                inputs, labels, packing = self._micro_batch(torch.cat(micro_batches))
                total = self.pipeline.run(inputs, labels, train, packing)
                if total is None:
                    return torch.zeros((), device=self.device)
                return total / self.scaler.scale if self.scaler else total  # the loss function scaled it, eval too
            total = torch.zeros((), device=self.device)
            for i, tokens in enumerate(micro_batches):
                loss = self.engine.forward(self.stages[0].model, *self._micro_batch(tokens)) / self.num_micro
                if train:
                    with torch.autocast(self.device.type, enabled=False):
                        self.engine.backward(
                            loss * self.scaler.scale if self.scaler else loss, last=i == len(micro_batches) - 1
                        )
                total += loss.detach()
            return total

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """(Every rank.) [the mean of the last stage's `value` over the loss role (dp x cp), the number of ranks
        where it is not finite], on the device.

        One all-reduce over the world: the last stage's TP rank 0 of each (dp, cp) coordinate contributes its
        value, every rank a flag, so every rank learns the mean (for guards) and the verdict. Every CP rank
        holds as many tokens, so the mean of their means is the sequence's mean."""
        own = self.mesh.is_last_stage and self.mesh.tp_rank == 0
        both = torch.stack([value.float() if own else torch.zeros((), device=self.device), (~value.isfinite()).float()])
        if self.mesh.world_size > 1:
            dist.all_reduce(both)
        return torch.stack([both[0] / self.mesh.role("loss").size, both[1]])  # no host tensor: no copy, no sync

    def train_step(self, micro_batches: list[torch.Tensor]) -> None:
        """Forward and backward every micro-batch, sync and clip gradients, step.

        A step whose loss or gradients are not finite never changes the weights (see guards.py). Where the engine
        can skip a step on the device (`skips_on_device`: torch's fused AdamW), it is told to skip such a step by
        a flag the device computes, and the step's loss and norm wait on the device until the loop needs them
        (`settle`: a logged step, a checkpoint): no host sync per step. Otherwise they are read here, before the
        step, in one transfer."""
        self.beat("forward-backward")
        self.moe.before_step(self.num_micro, self.scaler.scale if self.scaler else self.engine.backward_scale())
        total = self._forward_backward(micro_batches, train=True)
        self.beat("gradient sync")
        engine = self.engine
        engine.finish_grads()
        grads = engine.grads()
        if self.scaler:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        if checkpointing.fault_hook("nan", self.step + 1, self.mesh.rank):
            torch._foreach_mul_(grads, float("nan"))
        if checkpointing.fault_hook("spike", self.step + 1, self.mesh.rank):
            total = total * 100
        self.beat("gradient norm")
        norm_on_device = engine.grad_norm() if engine.norm_before_step else None
        mean = self._global_mean(total)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        if self.deferred:
            bad = (mean[1] > 0) | ~torch.isfinite(norm_on_device)
            self.beat("optimizer step")
            engine.step(lr, norm_on_device, skip=bad)
            local = local_flags(total, torch.isfinite(engine.local_squares))
            self.pending.append((self.step + 1, torch.stack([mean[0], mean[1], norm_on_device]), local))
            stepped = True
        else:
            numbers = mean if norm_on_device is None else torch.cat([mean, norm_on_device.view(1)])
            loss, nonfinite, *norm = numbers.tolist()  # the one host read of this step
            norm = norm[0] if norm else 0.0
            local = lambda: local_flags(total, grads_finite(grads, self.device))  # noqa: E731
            stepped = self._may_step(loss, not nonfinite, norm, local)
            if stepped:
                self.beat("optimizer step")
                stepped = engine.step(lr, norm_on_device)
                if norm_on_device is None:
                    norm = self._after_engine_step(engine.grad_norm().item(), stepped)
            self.reading = (loss, norm)
        engine.zero_grads()
        self.moe.after_step(stepped)

    def settle(self) -> tuple[float, float]:
        """(Every rank.) The loss and gradient norm of the last step; the steps since the last read are read in one
        transfer and held to the guards in order. A bad one's update was skipped on the device: it stops the run
        here, before any checkpoint or record holds a later state, or (train.on_nonfinite: skip) counts."""
        if self.pending:
            values = torch.stack([numbers for _, numbers, _ in self.pending]).tolist()
            for (step, _, local), (_, nonfinite, norm) in zip(self.pending, values):
                if nonfinite or not math.isfinite(norm):
                    self._nonfinite(step, not nonfinite, math.isfinite(norm), local.clone)
                else:
                    self.skips.ok()
            self.pending = []
            self.reading = (values[-1][0], values[-1][2])
        return self.reading

    def _after_engine_step(self, norm: float, applied: bool) -> float:
        """The norm an engine's own step computed. A step it skipped (DeepSpeed's fp16 overflow, its scale then
        lowered) is counted, as Adam did not take it; a non-finite norm of a step it took stops the run before any
        checkpoint holds that state (train.on_nonfinite: skip needs the norm before the step: the native engine)."""
        if not applied:
            self.nonfinite_skips += 1
            self.adam_skips += 1
        elif not math.isfinite(norm):
            raise TrainingStopped(
                f"step {self.step + 1}: non-finite gradients (norm {norm}) found by the {self.cfg.parallel.engine} "
                "engine's step; stopped, so no checkpoint holds this state; lower optim.lr"
            )
        return norm

    def _may_step(self, loss: float, loss_finite: bool, norm: float, local: Callable[[], torch.Tensor]) -> bool:
        """Whether this step's gradients may update the weights; counts skips and stops per guards.py."""
        step = self.step + 1
        if self.scaler is not None:  # fp16: the scaler's rule (halve the scale and skip on overflow)
            if not self.scaler.update(norm):
                self.adam_skips += 1
                if self.scaler.scale <= self.scaler.min_scale:
                    self.skips.skipped(step, "fp16 overflow at the minimum loss scale")
                return False
            return self._not_a_spike(step, loss)
        if loss_finite and math.isfinite(norm):
            return self._not_a_spike(step, loss)
        self._nonfinite(step, loss_finite, math.isfinite(norm), local)
        return False

    def _nonfinite(self, step: int, loss_finite: bool, norm_finite: bool, local: Callable[[], torch.Tensor]) -> None:
        """(Every rank alike.) Step `step` had a non-finite loss or norm: stop (naming the ranks from each one's
        `local()` flags), or count it as skipped."""
        what = " and ".join(w for w, bad in (("loss", not loss_finite), ("gradients", not norm_finite)) if bad)
        if self.cfg.train.on_nonfinite == "stop":
            raise TrainingStopped(
                f"step {step}: non-finite {what} ({bad_ranks(local())}); stopped before the optimizer step, so no "
                "checkpoint holds this state; lower optim.lr, or set train.on_nonfinite: skip"
            )
        self.nonfinite_skips += 1
        self.adam_skips += 1
        self.skips.skipped(step, f"non-finite {what}")

    def _not_a_spike(self, step: int, loss: float) -> bool:
        """True for a finite step whose loss is no spike; a spike stops the run or raises LossSpike to rewind."""
        if self.spikes.is_spike(loss):
            factor, mean = self.cfg.train.loss_spike_factor, self.spikes.reference()
            spike = f"step {step}: loss spike ({loss:.4g} > {factor} x recent mean {mean:.4g})"
            if self.cfg.train.on_loss_spike == "stop":
                raise TrainingStopped(f"{spike}; stopped before the optimizer step (train.on_loss_spike: stop)")
            raise LossSpike(spike)
        self.skips.ok()
        return True

    @torch.no_grad()
    def evaluate(self) -> float:
        for _, model in self.stages:
            model.eval()
        total = torch.zeros((), device=self.device)
        batches = iter(self._loader(self.valid_ds, 0))
        for _, micro_batches in zip(range(self.cfg.train.eval_iters), batches):
            self.beat("evaluation")
            total += self._forward_backward(micro_batches, train=False)
        batches.close()
        for _, model in self.stages:
            model.train()
        return self._global_mean(total / self.cfg.train.eval_iters)[0].item()

    # --- checkpoints ------------------------------------------------------------------------
    def stateful_parts(self) -> dict[str, Stateful]:
        """The training state a checkpoint holds, by part (train/stateful.py). The LR schedule is a function of
        the step; Adam's step count is fewer than `step` by the steps skipped, counted, not derived from what
        this run's precision skips (a run resumed in another precision keeps its count)."""

        def restore_progress(meta: dict) -> None:
            self.step, self.nonfinite_skips = meta["step"], meta.get("nonfinite_skips", 0)
            self.adam_skips = meta["step"] - meta.get("optimizer_steps", meta["step"])

        def restore_data(meta: dict) -> None:
            self.consumed_samples = meta["consumed_samples"]
            saved = meta.get("sample_order")
            if saved is not None and saved != sample_order(self.train_ds) and self.mesh.rank == 0:
                print_line(
                    f"warning: the training data's sample order is not the checkpoint's (train.steps x "
                    "global_batch_size asks a source for another number of epochs): from sample "
                    f"{self.consumed_samples:,} on the run reads the new order, where samples it has seen may come "
                    "again, as Megatron-LM's would"
                )

        def restore_scale(meta: dict) -> None:
            if self.scaler and meta.get("loss_scale"):
                self.scaler.load_state(meta["loss_scale"])
            elif self.scaler and meta.get("deepspeed_loss_scale"):  # saved by the DeepSpeed engine
                self.scaler.load_state(from_deepspeed(meta["deepspeed_loss_scale"], meta.get("nonfinite_skips", 0)))

        def restore_guards(meta: dict) -> None:
            guards = meta.get("guards") or {}
            self.skips.in_row = guards.get("skipped_in_row", 0)
            self.spikes.recent.clear()
            self.spikes.recent.extend(guards.get("recent_losses", []))

        engine = self.engine
        return {
            "model": Stateful(engine.weight_pieces, restore=lambda meta: engine.weights_loaded()),
            "optimizer": Stateful(
                engine.optimizer_pieces,
                lambda: {"optimizer_steps": self.step - self.adam_skips},
                lambda meta: engine.set_optimizer_steps(meta.get("optimizer_steps", meta["step"])),
            ),
            "engine": Stateful(values=engine.state_values, restore=engine.restore_values),
            "schedule": Stateful(
                values=lambda: {"step": self.step, "nonfinite_skips": self.nonfinite_skips}, restore=restore_progress
            ),
            "data": Stateful(
                values=lambda: {"consumed_samples": self.consumed_samples, "sample_order": sample_order(self.train_ds)},
                restore=restore_data,
            ),
            "loss_scaler": Stateful(
                values=lambda: {"loss_scale": self.scaler.state() if self.scaler else None}, restore=restore_scale
            ),
            "router_biases": Stateful(lambda for_save: router_bias_pieces(self.moe.layers)),
            "guards": Stateful(  # a resumed run judges spikes against the same recent losses, counts skips on
                values=lambda: {
                    "guards": {"skipped_in_row": self.skips.in_row, "recent_losses": list(self.spikes.recent)}
                },
                restore=restore_guards,
            ),
        }

    def state_tensors(self, for_save: bool) -> list[GlobalPiece]:
        """Every part's tensors as global pieces: views of this rank's memory that a save writes and a load reads
        into, in place."""
        return all_pieces(self.stateful_parts(), for_save)

    # --- the loop ---------------------------------------------------------------------------
    def run(self, dog: Watchdog | None = None) -> None:
        """Train to `train.steps`, evaluating, logging and checkpointing on the way.

        Raises `Preempted` after saving when a save-and-stop was requested (see preemption.py), and
        `TrainingStopped` when a guard stops the run (guards.py). A watchdog ends the job when this rank
        makes no progress for `parallel.timeout_minutes` (watchdog.py): `dog`, the one `train` started
        before the trainer was built (watching start-up), or else one of its own.
        """
        cfg, mesh = self.cfg, self.mesh
        if dog is None:
            with Watchdog(self.run_dir, mesh.rank, mesh.world_size, cfg.parallel.timeout_minutes * 60) as dog:
                self.run(dog)
            return
        dog.beat(0, "start-up: reading the checkpoint")
        checkpointing.maybe_resume(self)
        if self.step >= cfg.train.steps:  # a finished run started again (a re-run, a reused run directory)
            if mesh.rank == 0:
                print_line(
                    f"megatronlite: nothing to do: {self.run_dir} is at step {self.step} and train.steps is "
                    f"{cfg.train.steps} (raise train.steps to train further, or use another --run-dir)"
                )
            return
        if mesh.rank == 0:  # only once nothing at start-up refused the run: a refused one leaves config.yaml as it was
            write_resolved_config(cfg, self.run_dir)
        if restart_count() and mesh.rank == 0:
            record_restart(self.run_dir, self.step)
            print_line(f"restart {restart_count()}: going on from step {self.step}")
        log = RunLog(cfg, self.run_dir, mesh, self.device, start_step=self.step)
        saver = checkpointing.Checkpointer(self)
        watch = PreemptionWatch(self.run_dir, self.device)
        tf32 = use_tf32(self.device, cfg.train.tf32)
        if mesh.rank == 0:
            print_line(
                f"megatronlite: {cfg.name} on {mesh.world_size} worker(s) "
                f"(tp={mesh.tp} pp={mesh.pp} cp={mesh.cp} dp={mesh.dp}), device {self.device}, "
                f"precision {cfg.train.precision}{' (fp32 matmuls in TF32)' if tf32 else ''}, "
                f"optimizer {self.engine.description}, from step {self.step}"
            )
            print_line(kernels.summary(self.options.kernels, self.device))
            warning = moe_layout_warning(cfg.model, mesh.dp, self.num_micro)
            if warning:
                print_line(warning)
        batches = iter(self._loader(self.train_ds, self.consumed_samples))
        ckpt = cfg.checkpoint
        try:
            dog.patient = False  # training: a rank without progress for the timeout is stalled
            self.beat = lambda phase: dog.beat(self.working, phase)
            while self.step < cfg.train.steps:
                self.working = self.step + 1  # the step the phases below belong to, its evaluation and save too
                checkpointing.fault_hook("step", self.step + 1, mesh.rank)
                checkpointing.fault_hook("kill", self.step + 1, mesh.rank)
                self.beat("data")
                try:
                    self.train_step(next(batches))
                except LossSpike as spike:
                    batches.close()
                    self._rewind(spike, saver, log)
                    batches = iter(self._loader(self.train_ds, self.consumed_samples))
                    continue
                self.step += 1
                self.consumed_samples += cfg.train.global_batch_size
                eval_due = cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0
                eval_loss = None
                if eval_due:
                    with log.paused():
                        eval_loss = self.evaluate()
                self.beat("preemption check")
                stop = watch.requested()
                due = (ckpt.interval and self.step % ckpt.interval == 0) or self.step == cfg.train.steps
                save, logged = ckpt.save and (due or stop), log.due(self.step, eval_loss)
                loss, norm = self.settle() if logged or save or stop else self.reading
                extra = self._skip_record()
                if logged:
                    extra.update(self.moe.record())
                log.step_done(self.step, loss, norm, self.consumed_samples, eval_loss, extra)
                if save:
                    self.beat("checkpoint save")
                    with log.paused():
                        saver.save()
                if stop and self.step < cfg.train.steps:
                    watch.clear()
                    saver.wait()  # every rank stops here alike: the save it made is committed, or failed
                    raise Preempted(f"{self._stopped_at(save, saver)} and stopped on request")
            self.beat("final checkpoint save")  # watched: a rank stalled in the last write ends the job too
            saver.wait()
            watch.clear()  # the run is done: a request after its last look is moot, not one to the next run
            if saver.last_failed:  # a job that ends well must have its last step saved
                kept = store.latest_complete(self.run_dir / "checkpoints")
                raise TrainingStopped(
                    f"trained to step {self.step}, but its checkpoint could not be written (see above); "
                    + (f"{kept.name} is the latest" if kept else "there is no checkpoint")
                    + ": free space and run the same command again to redo the steps after it"
                )
        except BaseException:  # (after a stop on request too: its save is already settled)
            saver.abandon()  # this rank alone may be failing: no collective the others will not join
            raise
        finally:
            self.beat = lambda phase: None
            batches.close()
            log.close()

    def _stopped_at(self, saved: bool, saver: checkpointing.Checkpointer) -> str:
        """What a stop on request leaves: the step saved, or where a resume goes on from."""
        if saved and not saver.last_failed:
            return f"saved step {self.step}"
        kept = store.latest_complete(self.run_dir / "checkpoints")
        why = "its checkpoint could not be written" if saved else "checkpoint.save is off"
        return f"at step {self.step} ({why}; a resume goes on from {kept.name if kept else 'the start'})"

    def _rewind(self, spike: LossSpike, saver: checkpointing.Checkpointer, log: RunLog) -> None:
        """Back to the last checkpoint, and on past the batches up to the spike's (`train.on_loss_spike: rewind`)."""
        saver.wait()
        step_dir = store.latest_complete(self.run_dir / "checkpoints")
        if step_dir is None:
            raise TrainingStopped(f"{spike}; no checkpoint to rewind to yet")
        self.rewinds.rewound(self.step + 1, str(spike))
        resume_at = self.consumed_samples + self.cfg.train.global_batch_size
        self.engine.zero_grads()
        checkpointing.load(self, step_dir)  # the guards too: spikes are judged against the same recent losses
        skipped = resume_at - self.consumed_samples
        self.consumed_samples = resume_at
        log.rewind(self.step)
        if self.mesh.rank == 0:
            needed = resume_at + (self.cfg.train.steps - self.step) * self.cfg.train.global_batch_size
            wraps = (
                f"; the run now needs {needed} samples, past the {len(self.train_ds)} its data holds: the last steps "
                "read samples from the start of the order again"
                if needed > len(self.train_ds)
                else ""
            )
            print_line(f"{spike}: rewound to {step_dir.name}, skipping the next {skipped} samples of data{wraps}")

    def _skip_record(self) -> dict:
        """The metrics of skipped steps: fp16's loss scale and overflows, or the non-finite steps skipped."""
        if self.scaler is not None:
            return {"loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped}
        shown = self.cfg.train.on_nonfinite == "skip" or self.nonfinite_skips
        return {"nonfinite_skipped": self.nonfinite_skips} if shown else {}

    def resolved_config_yaml(self) -> str:
        return config_mod.to_yaml(self.cfg)


def resolve_precision(cfg: Config, device: torch.device) -> None:
    """Fix `train.precision: auto` to what it means on `device` (config.precision_on), so the run's config.yaml,
    its memory check and its engine all see one value."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    cfg.train.precision = config_mod.precision_on(cfg.train, device.type, bf16)


def use_tf32(device: torch.device, tf32: bool) -> bool:
    """On CUDA, let fp32 matmuls use TF32 (`train.tf32`, default on: several times the fp32 rate); returns
    whether they do. The legacy flag, as tests/test_gpu.py sets it: torch refuses to mix it with the new API."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return tf32


def write_resolved_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, run_dir / "config.yaml")
