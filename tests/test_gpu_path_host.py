"""The GPU path's host-side choices, checked on CPU: no host sync in the gradient norm and clipping, nor in a
step (its numbers read at logged steps and checkpoints), preemption polled every few steps, TF32 on CUDA by
default, the GPU index under srun's binding, and checkpoint barriers on a gloo group of their own."""

import pytest
import torch
import torch.distributed as dist
from helpers import error_of, set_args, tiny_overrides, train

from megatronlite import config
from megatronlite.checkpoint import store
from megatronlite.errors import UserError
from megatronlite.optim.clip import clip_grads, global_grad_norm
from megatronlite.parallel.mesh import Mesh, build_mesh, cuda_device
from megatronlite.train import checkpointing, preemption
from megatronlite.train.trainer import Trainer, use_tf32


def _grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(dt) for s, dt in (((7, 5), torch.float32), ((300,), torch.bfloat16))]


def _no_host_reads(monkeypatch) -> None:
    """.item() and .tolist() raise: each synchronizes with the device."""

    def refuse(self):
        raise AssertionError("a host read synchronizes with the device")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "under-the-limit"])
def test_norm_and_clipping_stay_on_the_device(monkeypatch, max_norm):
    """The same norm and clipped gradients as torch's clip_grad_norm_, with no .item() on the way."""
    grads, theirs = _grads(), [g.float().requires_grad_() for g in _grads()]
    for t in theirs:
        t.grad = t.detach().clone()
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    with monkeypatch.context() as m:
        _no_host_reads(m)
        norm, _ = global_grad_norm([(grads, [])], Mesh(), torch.device("cpu"))
        clip_grads(grads, norm, max_norm)
    assert norm.shape == () and norm.dtype == torch.float32
    torch.testing.assert_close(norm, want)
    for got, t in zip(grads, theirs):
        torch.testing.assert_close(got, t.grad.to(got.dtype))


@pytest.mark.parametrize("step_seconds, polls", [(0.01, [1, 2, 12, 22]), (4.0, [1, 2, 4, 6, 8]), (30.0, [1, 2, 3])])
def test_preemption_is_polled_about_every_ten_seconds_or_ten_steps(tmp_path, monkeypatch, step_seconds, polls):
    """The flag file is looked at only at polls: the first steps, then every POLL_STEPS steps when steps are
    fast, every POLL_SECONDS / step time steps (at least 1) when they are slow; a request is seen at a poll."""
    watch = preemption.PreemptionWatch(tmp_path, torch.device("cpu"))
    monkeypatch.setattr(preemption.time, "monotonic", lambda: step_seconds * watch.calls)  # a step per call
    looked = []
    exists = type(tmp_path).exists
    monkeypatch.setattr(type(tmp_path), "exists", lambda self: looked.append(watch.calls) or exists(self))
    seen = [watch.requested() for _ in range(polls[-1])]
    assert looked == polls and not any(seen)
    (tmp_path / preemption.FLAG_FILE).touch()
    while not watch.requested():
        assert watch.calls <= polls[-1] + preemption.POLL_STEPS
    assert looked[-1] == watch.calls


def test_tf32_on_cuda_unless_told_otherwise():
    """(Restored by hand: monkeypatch cannot undo a setattr on torch's cuBLAS flag module.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert config.TrainConfig().tf32 is True
        assert not use_tf32(torch.device("cpu"), True) and torch.backends.cuda.matmul.allow_tf32 is False
        assert use_tf32(torch.device("cuda", 0), True) and torch.backends.cuda.matmul.allow_tf32 is True
        assert not use_tf32(torch.device("cuda", 0), False) and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_key_is_a_checked_boolean(tmp_path, corpus):
    overrides = tiny_overrides(corpus, tmp_path / "run")
    assert config.load("configs/demo.yaml", [*overrides, "train.tf32=false"]).train.tf32 is False
    with pytest.raises(UserError, match="train.tf32"):
        config.load("configs/demo.yaml", [*overrides, "train.tf32=sometimes"])


@pytest.mark.parametrize(("local_rank", "visible", "index"), [(0, 8, 0), (5, 8, 5), (3, 1, 0), (5, 2, 1)])
def test_gpu_index_wraps_over_the_visible_devices(monkeypatch, local_rank, visible, index):
    """srun with one GPU per task: every task sees its GPU as cuda:0 whatever its LOCAL_RANK."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert cuda_device(local_rank) == torch.device("cuda", index)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
def test_checkpoint_barriers_use_their_own_gloo_group(tmp_path, corpus, monkeypatch):
    run = tmp_path / "run"
    cfg = config.load("configs/demo.yaml", [*tiny_overrides(corpus, run), "train.device=cpu"])
    trainer = Trainer(cfg, run, build_mesh(cfg, 1, 0), torch.device("cpu"))
    saver = checkpointing.Checkpointer(trainer)
    assert saver.group is not None and saver.group is not dist.group.WORLD
    assert dist.get_backend(saver.group) == "gloo"
    groups = []
    for name in ("barrier", "all_reduce", "all_gather_object"):  # ours: the vote before and after (DCP's own vary)
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _f=original, **kw: groups.append(kw.get("group")) or _f(*a, **kw))
    trainer.step = 1
    saver.save()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000001"
    assert len(groups) >= 2 and all(g is saver.group for g in groups), groups


# host reads: a step's loss and norm stay on the device until a logged step or a checkpoint needs them
_READS = {"train.steps": 8, "logging.interval": 4, "checkpoint.interval": 8}
_SYNCED = {"train.loss_spike_factor": 1.0e9}  # spike detection (never firing) needs each step's loss on the host


def _train_recording_reads(run, corpus, monkeypatch, **extra) -> tuple[list[dict], list[int]]:
    """Train in this process, with every .item() / .tolist() inside a step refused where the trainer defers its
    reads (asserted to be exactly when spike detection is off); the steps read on the host."""
    settled, step = [], Trainer.train_step

    def train_step(self, micro_batches):
        assert self.deferred == ("train.loss_spike_factor" not in extra)
        if self.deferred:
            with monkeypatch.context() as m:
                _no_host_reads(m)
                return step(self, micro_batches)
        return step(self, micro_batches)

    def settle(self, settle=Trainer.settle):
        settled.append(self.step)
        return settle(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", train_step)
        m.setattr(Trainer, "settle", settle)
        return train(run, tiny_overrides(corpus, run, **{**_READS, **extra})), settled


def test_steps_are_read_on_the_host_only_when_logged_or_saved(tmp_path, corpus, monkeypatch):
    """No host sync inside a step (fused AdamW skips a bad step on the device); the numbers read at the logged
    steps are those of a run that reads every step before stepping."""
    deferred, settled = _train_recording_reads(tmp_path / "deferred", corpus, monkeypatch)
    assert settled == [4, 8]
    synced, _ = _train_recording_reads(tmp_path / "synced", corpus, monkeypatch, **_SYNCED)
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in deferred] == [
        (m["step"], m["loss"], m["grad_norm"]) for m in synced
    ]


def test_a_bad_step_skipped_on_the_device_is_counted_or_stops_the_run_at_the_next_read(
    tmp_path, corpus, monkeypatch, capsys
):
    """nan:3 between reads: with train.on_nonfinite: skip the device skipped exactly that update (the later losses
    equal a run that decided on the host, whose Adam also did not count the step); by default the run stops at
    step 4's read, naming step 3 and the rank, with no checkpoint written."""
    monkeypatch.setenv("MEGATRONLITE_FAULT", "nan:3")
    skip = {"train.on_nonfinite": "skip"}
    deferred, _ = _train_recording_reads(tmp_path / "deferred", corpus, monkeypatch, **skip)
    synced, _ = _train_recording_reads(tmp_path / "synced", corpus, monkeypatch, **skip, **_SYNCED)
    assert [m["nonfinite_skipped"] for m in deferred] == [1, 1]
    assert [(m["loss"], m["grad_norm"]) for m in deferred] == [(m["loss"], m["grad_norm"]) for m in synced]
    run = tmp_path / "stops"
    sets = set_args(tiny_overrides(corpus, run, **_READS))
    line = error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(run), *sets)
    assert line.startswith("megatronlite: error: step 3: non-finite gradients (gradients on rank(s) 0)"), line
    assert store.latest_complete(run / "checkpoints") is None


def test_a_weight_is_cast_to_bf16_once_per_step_not_per_micro_batch(tmp_path, corpus):
    """One autocast region per step keeps each weight's bf16 copy across its micro-batches (4 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.precision": "bf16", "train.global_batch_size": 8})
    cfg = config.load("configs/demo.yaml", [*sets, "train.device=cpu", "train.micro_batch_size=2"])
    trainer = Trainer(cfg, run, build_mesh(cfg, 1, 0), torch.device("cpu"))
    weight = trainer.params["layers.0.attention.qkv.weight"]

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() == weight.data_ptr():
                Casts.count += kwargs.get("dtype") == torch.bfloat16
            return func(*args, **kwargs)

    batches = iter(trainer._loader(trainer.train_ds, 0))
    micro_batches = next(batches)
    batches.close()
    assert trainer.num_micro == len(micro_batches) == 4
    with Casts():
        trainer.train_step(micro_batches)
    assert Casts.count == 1
