"""The DeepSpeed engine (`parallel.engine: deepspeed`): DeepSpeed's ZeRO 1-3 and its CPU / NVMe offload behind the
engine seam, on megatronlite's model, data, mesh, schedule and checkpoints.

What DeepSpeed gets. `deepspeed.initialize` over the (single) pipeline stage with our AdamW (its parameter groups:
decay on matrices only) or, with offload, DeepSpeedCPUAdam over the same groups; and our mesh as its `mpu`: model
parallel = TP, data parallel = the grad role (dp x cp: CP ranks hold other tokens of the same sequences, their
gradients average as DP's do). TP-split parameters are marked `tensor_model_parallel`, so its norm counts replicated
ones once. Its config is generated from ours (config_for) with a user's `deepspeed:` section merged over it: micro-
batch and accumulation steps, the ZeRO stage, offload, the reduce / all-gather / prefetch buckets from
`parallel.bucket_mb` (DeepSpeed's defaults of 5e8 elements are 2 GB buffers in fp32), bf16/fp16 from
`train.precision` (fp16 with DeepSpeed's dynamic loss scale from `optim.initial_loss_scale`), `gradient_clipping`
from `optim.clip_grad` (the same factor as ours: max_norm / (norm + 1e-6) when above 1). The learning rate is ours,
set on its parameter groups before each step; its scheduler is unused.

A step. Each micro-batch's forward runs through DeepSpeed's engine, its loss (already divided by the micro-batches)
through `engine.backward` without its own division, the last one at the accumulation boundary (where ZeRO-1 reduces;
ZeRO-2/3 reduce as they go); then one `engine.step`. Its gradient norm is known only inside its step, so the trainer
checks the loss before the step and the norm after (non-finite: the run stops before any checkpoint holds the step).

Checkpoints. The same layout-free checkpoint as the native engine, from DeepSpeed's fp32 master partitions and their
Adam moments, each a flat slice of one parameter (ZeRO-1/2: `param._hp_mapping`, the fragment of the parameter in
this rank's partition; ZeRO-3: `safe_get_local_fp32_param`, the parameter's 1/D) written as global pieces like
ZeRO-1's slices: no parameter is ever gathered for a save, and a load reads into those views, after which the
model's copy is refreshed from them (ZeRO-1/2: every rank's updated partition all-gathered; ZeRO-3: each rank's own
partition).

Refused, each with one line (config.validate_engine): pipeline parallelism (DeepSpeed's ZeRO-2/3 do not run with it,
and its pipeline needs its own PipelineModule), expert parallelism (its MoE groups are not ours), sequence
parallelism and other gradients that must be summed over TP before the DP reduction (its reduction cannot wait for
that sum), ZeRO stage 0 (the native engine's plain DP), `train.on_nonfinite: skip` (needs the norm before the step),
optim.impl triton / apex.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from megatronlite.checkpoint.views import ADAM_STATES, GlobalPiece, slice_pieces, stored_name
from megatronlite.config import Config
from megatronlite.errors import UserError
from megatronlite.optim.adamw import build_adamw, param_groups
from megatronlite.optim.loss_scale import to_deepspeed
from megatronlite.parallel.mesh import Group, Mesh

# DeepSpeed's DynamicLossScaler: the scale, its step count, the last overflow's, and the overflows left to allow
LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class _MeshMPU:
    """DeepSpeed's `mpu` interface over our mesh: model parallel = TP, data parallel = the grad role."""

    def __init__(self, mesh: Mesh) -> None:
        self.tp, self.dp = _real_group(mesh.role("tensor")), _real_group(mesh.role("grad"))

    def get_model_parallel_rank(self) -> int:
        return self.tp[0].rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp[0].size

    def get_model_parallel_group(self):
        return self.tp[1]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp[0].ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.dp[0].rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp[0].size

    def get_data_parallel_group(self):
        return self.dp[1]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp[0].ranks)


_SINGLETONS: list = []  # each rank's one-rank process group, made once by every rank together


def _real_group(group: Group) -> tuple[Group, dist.ProcessGroup]:
    """A role with a process group DeepSpeed can use: ours, or for a one-rank role a one-rank group (None would
    mean the whole world to torch.distributed)."""
    if group.pg is not None:
        return group, group.pg
    if not _SINGLETONS:
        _SINGLETONS.append(dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])[0])
    return group, _SINGLETONS[0]


def config_for(cfg: Config, dp: int, micro_batches: int) -> dict:
    """The DeepSpeed config of a run: generated from ours, then the user's `deepspeed:` section merged over it."""
    t, o, stage = cfg.train, cfg.optim, cfg.parallel.zero
    bucket = int(cfg.parallel.bucket_mb * 2**20 / 4)  # elements of parallel.bucket_mb in fp32 (DeepSpeed: 5e8)
    zero: dict = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
    if o.offload_to != "none":
        target = {"device": o.offload_to, **({"nvme_path": o.nvme_path} if o.offload_to == "nvme" else {})}
        zero["offload_optimizer"] = target
        if stage == 3:
            zero["offload_param"] = target
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": t.micro_batch_size * micro_batches * dp,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our metrics say what a step did
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": int(math.log2(o.initial_loss_scale))}
    return _merged(out, cfg.deepspeed or {})  # its keys checked by config.validate_engine


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedEngine:
    norm_before_step = False
    skips_on_device = False  # its step decides (and reads) on the host itself

    def __init__(
        self, cfg: Config, mesh: Mesh, stages: list, late_sync: dict, num_micro: int, device: torch.device
    ) -> None:
        if late_sync:
            raise UserError(
                f"parallel.engine: deepspeed cannot sum {next(iter(late_sync))}'s gradient over its other ranks "
                "before DeepSpeed reduces it (sequence parallelism, q/k norms under TP); use parallel.engine: native"
            )
        import deepspeed

        self.cfg, self.mesh, self.device = cfg, mesh, device
        (_, model), *more = stages
        assert not more, "validated: no pipeline with the DeepSpeed engine"
        self.params = dict(model.named_parameters())
        # DeepSpeed asserts its launcher's LOCAL_RANK (torchrun sets it; `megatronlite train` in one process does not)
        os.environ.setdefault("LOCAL_RANK", str(device.index or 0))
        if not dist.is_initialized():  # one process: DeepSpeed still needs a process group (of one rank)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        for p in self.params.values():
            p.tensor_model_parallel = p.sharding.dim is not None  # DeepSpeed's norm counts the others once
        _require_half_precision(cfg.train.precision, device)
        if cfg.optim.offload_to == "nvme":
            _require_op("async_io", "optim.offload: nvme", "libaio's headers and library (apt install libaio-dev)")
        mpu = _MeshMPU(mesh)
        ds_config = config_for(cfg, mpu.get_data_parallel_world_size(), num_micro)
        optimizer, self.description = self._optimizer(cfg, device)
        with _quiet():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config, mpu=mpu, dist_init_required=False
            )
        self.stage = cfg.parallel.zero
        self.dp_rank = mpu.get_data_parallel_rank()
        offload = f", offload {cfg.optim.offload_to}" if cfg.optim.offload_to != "none" else ""
        self.description = f"DeepSpeed {deepspeed.__version__} ZeRO-{self.stage}{offload}, {self.description}"

    def _optimizer(self, cfg: Config, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
        o = cfg.optim
        if o.offload_to == "none":
            return build_adamw(self.params, o, device)
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use

        _require_op("cpu_adam", "optim.offload: cpu", "a C++ compiler (apt install g++)")
        groups = param_groups(self.params, o.weight_decay)
        adam = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        return adam, "DeepSpeedCPUAdam (AdamW)"

    # --- a step -------------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, *inputs: object) -> torch.Tensor:
        """Through DeepSpeed's engine: its forward counts the micro-steps that ZeRO-3's gradient accumulation
        reads, and lets ZeRO-3 gather parameters used outside their module (the output layer in the loss)."""
        return self.engine(*inputs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # our loss is already divided by the micro-batches

    def backward_scale(self) -> float:
        """Its fp16 optimizer's current dynamic loss scale (a float on the host: no sync), else 1.0."""
        return float(getattr(getattr(self.optimizer, "loss_scaler", None), "cur_scale", 1.0))

    def finish_grads(self) -> None:
        """DeepSpeed reduced them in its backward (ZeRO-2/3) or reduces them in its step (ZeRO-1)."""

    def grads(self) -> list[torch.Tensor]:
        return []

    def grad_norm(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def step(self, lr: float, norm: torch.Tensor | None, skip: torch.Tensor | None = None) -> bool:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        return self.engine.was_step_applied()

    def zero_grads(self) -> None:
        self.engine.zero_grad()

    # --- checkpoints --------------------------------------------------------------------------
    def _ensure_states(self) -> None:
        """Adam's states of DeepSpeed's fp32 partitions, made (zeros) before its first step creates them, so that
        a load can read into them; ZeRO-1/2 then link each parameter's fragment of them."""
        base = self.optimizer.optimizer
        if self.stage == 3:  # its optimizer steps one flat sub-group at a time, keyed by the flat partition
            flats = list(self.optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [p for group in base.param_groups for p in group["params"]]
        fused = base.defaults.get("fused")
        for flat in flats:
            if not base.state[flat]:
                # torch's AdamW counts steps in a tensor (on the device when fused); DeepSpeedCPUAdam in an int
                step = (
                    torch.zeros((), device=flat.device if fused else "cpu")
                    if isinstance(base, torch.optim.AdamW)
                    else 0
                )
                base.state[flat].update(step=step, exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if self.stage < 3:
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _local(self, p: torch.nn.Parameter, key: str | None) -> tuple[torch.Tensor, int] | None:
        """This rank's part of `p`'s fp32 master weights (key None) or of an Adam moment: a flat view, and where
        it starts in the flattened parameter (None: this rank holds none of it)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            flat = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            start = self.dp_rank * p.ds_tensor.ds_numel
            return (flat[: max(0, min(flat.numel(), p.ds_numel - start))], start) if start < p.ds_numel else None
        mapping = p._hp_mapping
        if mapping is None:
            return None
        flat = mapping.get_hp_fragment(key)
        return flat, mapping.lp_fragment_address.start

    def _pieces(self, prefix: str, key: str | None, for_save: bool) -> list[GlobalPiece]:
        out = []
        for name, p in self.params.items():
            stored, local = stored_name(name, p.sharding, for_save), self._local(p, key)
            if stored is not None and local is not None:
                shape = tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape)
                out += slice_pieces(f"{prefix}{stored}", local[0], local[1], shape, p.sharding, self.mesh)
        return out

    def weight_pieces(self, for_save: bool) -> list[GlobalPiece]:
        return self._pieces("model.", None, for_save)

    def optimizer_pieces(self, for_save: bool) -> list[GlobalPiece]:
        self._ensure_states()
        return [piece for key in ADAM_STATES for piece in self._pieces(f"optim.{key}.", key, for_save)]

    def weights_loaded(self) -> None:
        """The model's copy of the loaded fp32 master weights: ZeRO-3 each rank its partition, ZeRO-1/2 every rank's
        updated partition all-gathered."""
        if self.stage < 3:
            self.optimizer.update_lp_params()
            return
        for p in self.params.values():
            local = self._local(p, None)
            if local is not None:
                p.ds_tensor.data[: local[0].numel()].copy_(local[0])

    def set_optimizer_steps(self, steps: int) -> None:
        self._ensure_states()
        for state in self.optimizer.optimizer.state.values():
            if "step" in state:
                step = state["step"]
                state["step"] = step.fill_(float(steps)) if torch.is_tensor(step) else steps

    def state_values(self) -> dict:
        """fp16's dynamic loss scale, where DeepSpeed keeps it (its ZeRO optimizer's scaler): a resume goes on at
        the scale and in the window it reached, not at `optim.initial_loss_scale` (a run of overflows)."""
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if not getattr(scaler, "dynamic", False):
            return {}
        return {"deepspeed_loss_scale": {name: getattr(scaler, name) for name in LOSS_SCALE_FIELDS}}

    def restore_values(self, meta: dict) -> None:
        """DeepSpeed's own scaler state, or the native engine's (`loss_scale`: its scale and the good steps since
        its last overflow) mapped onto it, so a run moved between engines goes on at the scale it reached."""
        saved, native = meta.get("deepspeed_loss_scale"), meta.get("loss_scale")
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if not getattr(scaler, "dynamic", False):
            return
        if saved:
            for name in LOSS_SCALE_FIELDS:
                setattr(scaler, name, saved[name])
        elif native:
            for name, value in to_deepspeed(native, scaler.cur_iter).items():
                setattr(scaler, name, value)


def _require_half_precision(precision: str, device: torch.device) -> None:
    """DeepSpeed refuses fp16/bf16 where its accelerator lacks them (on CPU: fp16 needs oneDNN's fp16, AVX512-FP16
    or AMX hardware): one line before it starts, not its traceback."""
    from deepspeed.accelerator import get_accelerator

    supported = {"fp16": get_accelerator().is_fp16_supported, "bf16": get_accelerator().is_bf16_supported}
    if precision in supported and not supported[precision]():
        raise UserError(
            f"train.precision {precision} with parallel.engine: deepspeed: DeepSpeed does not run {precision} on "
            f"this {device.type} device; use another train.precision or parallel.engine: native"
        )


def _require_op(name: str, setting: str, needs: str) -> None:
    """A DeepSpeed op `setting` needs, built on first use: one line saying why when it cannot build here."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    with _quiet():
        ok = ALL_OPS[name].is_compatible(verbose=False)
    if not ok:
        raise UserError(f"{setting} needs DeepSpeed's {name} op, which cannot build on this machine: it needs {needs}")


class _quiet:
    """DeepSpeed's start-up logging at warning level: its info lines would bury ours."""

    def __enter__(self) -> None:
        from deepspeed.utils import logger

        self.logger, self.level = logger, logger.level
        logger.setLevel(os.environ.get("MEGATRONLITE_DEEPSPEED_LOG", "WARNING"))

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)
