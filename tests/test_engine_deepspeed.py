"""The DeepSpeed engine beyond equivalence (tests/test_parallel_equivalence.py) and resumes across engines
(tests/test_checkpoint_layouts.py): the config it gets, what it refuses, and the memory its ZeRO stages hold."""

import json
from pathlib import Path

import pytest
import torch
from helpers import spawn, tiny_overrides

from megatronlite import config
from megatronlite.engine.deepspeed_zero import config_for
from megatronlite.errors import UserError
from megatronlite.plan.measure import live_tensor_bytes


def cfg_of(*sets: str) -> config.Config:
    return config.from_dict(config.apply_overrides({}, ["parallel.engine=deepspeed", *sets]))


def test_its_config_comes_from_ours_with_the_users_section_merged_over():
    cfg = cfg_of(
        "parallel.zero_stage=3",
        "optim.offload=cpu",
        "optim.clip_grad=0.5",
        "train.micro_batch_size=2",
        "train.precision=bf16",
        "parallel.bucket_mb=1",
        "deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0, overlap_comm: false}}",
    )
    got = config_for(cfg, dp=4, micro_batches=3)
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"], got["train_batch_size"]) == (
        2,
        3,
        24,
    )
    assert got["gradient_clipping"] == 0.5 and got["bf16"] == {"enabled": True}
    zero = got["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 2**18
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["overlap_comm"] is False


@pytest.mark.parametrize(
    "sets, message",
    [
        (["deepspeed={train_batch_size: 64}"], "deepspeed.train_batch_size is decided by megatronlite's train.global"),
        (["deepspeed={zero_optimization: {stage: 2}}"], "deepspeed.zero_optimization.stage is decided by parallel"),
        (["deepspeed={optimizer: {type: Adam}}"], "deepspeed.optimizer is decided by megatronlite's optim"),
    ],
)
def test_keys_our_settings_decide_are_refused_in_its_section(sets, message):
    with pytest.raises(UserError, match=message):
        config_for(cfg_of("parallel.zero_stage=2", *sets), dp=2, micro_batches=1)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["parallel.zero_stage=0"], "parallel.zero_stage must be 1, 2 or 3 with the deepspeed engine"),
        (["parallel.zero_stage=1", "parallel.pipeline=2"], "parallel.pipeline > 1 runs on the native engine"),
        (["parallel.zero_stage=1", "parallel.expert=2", "model.moe.num_experts=4"], "parallel.expert > 1 runs on"),
        (["parallel.zero_stage=2", "parallel.sequence_parallel=true", "parallel.tensor=2"], "sequence_parallel runs"),
        (["parallel.zero_stage=2", "train.on_nonfinite=skip"], "train.on_nonfinite skip needs the gradient norm"),
        (["parallel.zero_stage=2", "optim.impl=triton"], "optim.impl triton runs on the native engine"),
        (["parallel.zero_stage=2", "optim.offload=nvme"], "optim.offload: nvme needs optim.nvme_path"),
    ],
)
def test_what_the_deepspeed_engine_cannot_run_is_refused(sets, message):
    with pytest.raises(UserError, match=message):
        cfg_of(*sets)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["parallel.zero_stage=3"], "parallel.zero_stage: 3 .* runs on parallel.engine: deepspeed"),
        (["optim.offload=nvme", "optim.nvme_path=/nvme"], "optim.offload: nvme runs on parallel.engine: deepspeed"),
        (["deepspeed={zero_optimization: {overlap_comm: false}}"], "the deepspeed: section is read only with"),
    ],
)
def test_what_only_deepspeed_runs_is_refused_on_the_native_engine(sets, message):
    with pytest.raises(UserError, match=message):
        config.from_dict(config.apply_overrides({}, sets))


def test_an_op_that_cannot_build_is_one_line(monkeypatch):
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    from megatronlite.engine.deepspeed_zero import _require_op

    monkeypatch.setattr(type(ALL_OPS["async_io"]), "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(
        UserError, match="optim.offload: nvme needs DeepSpeed's async_io op, which cannot build .*libaio"
    ):
        _require_op("async_io", "optim.offload: nvme", "libaio's headers and library (apt install libaio-dev)")


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_by_deepspeed_and_counted(tmp_path, corpus):
    """DeepSpeed's fp16 skips a step whose scaled gradients overflow and lowers its scale: the run goes on (not a
    non-finite stop), the skips are counted, and Adam's step count in the checkpoint leaves them out. A resume goes
    on at the scale reached (not at `optim.initial_loss_scale`, which overflows again): the same losses and skips."""
    from deepspeed.accelerator import get_accelerator
    from helpers import read_metrics, resume_from, train_job

    from megatronlite.checkpoint import store

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    sets = {"train.steps": 10, "checkpoint.interval": 5, "train.precision": "fp16"}
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=2", f"optim.initial_loss_scale={2**24}"]
    done = train_job("configs/demo.yaml", run, 1, tiny_overrides(corpus, run, **sets) + ds)
    if not get_accelerator().is_fp16_supported():  # a CPU without oneDNN fp16 (AVX512-FP16 or AMX): one line
        assert done.returncode != 0 and "DeepSpeed does not run fp16 on this cpu device" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = [m["nonfinite_skipped"] for m in read_metrics(run)]
    assert skipped[0] == 1 and 0 < skipped[-1] < 10, skipped  # it overflows at first, then steps
    meta = store.read_meta(store.find_step_dir(run))
    assert meta["optimizer_steps"] == 10 - skipped[-1], (meta, skipped)
    resume_from(run, "step_0000005", resumed)
    done = train_job("configs/demo.yaml", resumed, 1, tiny_overrides(corpus, resumed, **sets) + ds)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = [(m["step"], m["loss"], m["nonfinite_skipped"]) for m in read_metrics(run)]
    assert [(m["step"], m["loss"], m["nonfinite_skipped"]) for m in read_metrics(resumed)] == numbers[5:]


BUCKET_MB = 0.125
STAGES = {  # name: overrides; measured in this order, in the same processes
    "native-zero0": [],
    "deepspeed-zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "deepspeed-zero3": [
        "parallel.engine=deepspeed",
        "parallel.zero_stage=3",
        "deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ],
}


def _held_after_training(rank: int, world: int, corpus: str, out: Path) -> None:
    """Each engine in turn trains 2 steps; the tensor bytes it leaves alive (model, gradients, optimizer, its
    buffers) are what this rank holds between steps."""
    from megatronlite.parallel.mesh import build_mesh
    from megatronlite.train.trainer import Trainer

    held = {}
    for name, sets in STAGES.items():
        run = out / name / "run"
        run.mkdir(parents=True, exist_ok=True)
        extra = {"model.hidden_size": 128, "model.ffn_hidden_size": 512, "model.num_layers": 4}
        extra |= {"train.steps": 2, "train.global_batch_size": 8, "checkpoint.save": "false"}
        overrides = tiny_overrides(corpus, run, **extra) + [f"parallel.bucket_mb={BUCKET_MB}", *sets]
        cfg = config.load("configs/demo.yaml", overrides + ["train.device=cpu"])
        before = live_tensor_bytes()
        trainer = Trainer(cfg, run, build_mesh(cfg, world, rank), torch.device("cpu"))
        trainer.run()
        held[name] = live_tensor_bytes() - before
        if name == "native-zero0":
            held["params"] = sum(p.numel() * p.element_size() for p in trainer.params.values())
        del trainer
    (out / f"rank{rank}.json").write_text(json.dumps(held))


@pytest.mark.slow
def test_zero_stages_hold_their_share_of_the_states(tmp_path, corpus):
    """Per rank at dp4, after training, with W the model's fp32 bytes and B = 3 buckets (reduce, all-gather,
    prefetch) of parallel.bucket_mb: stage 0 holds weights, gradients and two Adam moments (at least 4 W);
    ZeRO-3 at most a quarter of that plus a quarter of one more weight copy (DeepSpeed keeps its fp32 master
    apart from the model's fp32 partition) plus B; ZeRO-2 its whole weights plus that."""
    spawn(_held_after_training, 4, str(corpus), tmp_path, timeout=240)
    buckets = 3 * BUCKET_MB * 2**20
    for rank in range(4):
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        weights, stage0 = held["params"], held["native-zero0"]
        assert stage0 >= 4 * weights, held
        assert held["deepspeed-zero3"] <= stage0 / 4 + weights / 4 + buckets, held
        assert held["deepspeed-zero2"] <= weights + stage0 / 4 + weights / 4 + buckets, held
