"""Checkpoints resume in any layout, exactly; async equals sync; a kill mid-save loses nothing committed."""

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import final_weights, read_metrics, set_args, skip_without_async_io, tiny_overrides, train_job

from megatronlite.checkpoint import store
from megatronlite.untrusted import read_dcp_metadata

pytestmark = pytest.mark.slow  # every test launches training jobs, or reads what they saved

STEPS = 6
DS_PARTITION_ALL = "deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"
LAYOUTS = {
    "1": (1, []),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
    "dp4-distopt": (4, ["parallel.distributed_optimizer=true"]),
    "tp2xdp2-distopt": (4, ["parallel.tensor=2", "parallel.distributed_optimizer=true"]),
    "pp2xdp2-distopt": (4, ["parallel.pipeline=2", "parallel.distributed_optimizer=true"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "pp2-interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "pp2-gpipe": (2, ["parallel.pipeline=2", "parallel.pipeline_schedule=gpipe"]),
    "pp2xdp2-zero-bubble": (
        4,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zero_bubble"],
    ),
    "cp2xtp2": (4, ["parallel.context=2", "parallel.tensor=2"]),
    "cp2xdp2-distopt": (4, ["parallel.context=2", "parallel.distributed_optimizer=true"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "ep2xdp2-distopt": (4, ["parallel.expert=2", "parallel.distributed_optimizer=true"]),
    "ep4": (4, ["parallel.expert=4"]),
    # the DeepSpeed engine (ZeRO-3 partitioning every parameter: no size threshold)
    "ds-zero3-dp2": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3", DS_PARTITION_ALL]),
    "ds-zero3-dp4": (4, ["parallel.engine=deepspeed", "parallel.zero_stage=3", DS_PARTITION_ALL]),
    "ds-zero3-nvme": (
        2,
        [
            "parallel.engine=deepspeed",
            "parallel.zero_stage=3",
            DS_PARTITION_ALL,
            "optim.offload=nvme",
            f"optim.nvme_path={tempfile.gettempdir()}/mlite-nvme-resume",
        ],
    ),
}
# experts with a sigmoid router and its aux-loss-free selection biases (state saved beside the weights), the
# balance loss and a shared expert
MOE = {
    "model.moe.num_experts": 4,
    "model.moe.ffn_hidden_size": 48,
    "model.moe.router": "sigmoid",
    "model.moe.bias_update_rate": 0.01,
    "model.moe.aux_loss_coeff": 0.01,
    "model.moe.shared_expert_ffn_hidden_size": 32,
}


def overrides(corpus, run, **extra):
    sets = {
        "model.num_layers": 4,
        "train.steps": STEPS,
        "train.global_batch_size": 8,
        "checkpoint.interval": 3,
        "checkpoint.keep": 5,
    }
    return tiny_overrides(corpus, run, **{**sets, **extra})


def run_layout(run, corpus, layout, env=None, **extra):
    nproc, sets = LAYOUTS[layout]
    done = train_job("configs/demo.yaml", run, nproc, overrides(corpus, run, **extra) + sets, env=env)
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("ref") / "run"
    done = run_layout(run, corpus, "1")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(run), final_weights(run)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """Step-3 checkpoints written by tp2 x pp2, with the distributed optimizer by dp2 and tp2 x dp2, and by the
    DeepSpeed engine's ZeRO-3 at dp2."""
    out = {}
    for layout in ("tp2xpp2", "dp2-distopt", "tp2xdp2-distopt", "ds-zero3-dp2"):
        run = tmp_path_factory.mktemp(f"src-{layout}") / "run"
        done = run_layout(run, corpus, layout)
        assert done.returncode == 0, done.stderr[-3000:]
        out[layout] = run / "checkpoints" / "step_0000003"
    return out


def resume_from(step_dir, run):
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_dir, run / "checkpoints" / step_dir.name)
    (run / "checkpoints" / "latest").write_text(step_dir.name)


def assert_continues(run, reference, first_step):
    """Losses and gradient norms of the resumed steps, and the final weights, are the uninterrupted run's, to
    fp32 reduction order. Weights: atol 1e-4, since an element whose gradient is ~0 moves by lr/eps times its
    rounding error (up to ~2e-5 at lr 3e-3, eps 1e-8, measured by test_reference.py's author)."""
    ref_metrics, ref_weights = reference
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(first_step, STEPS + 1))
    for got, want in zip(metrics, ref_metrics[first_step - 1 :]):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5), (got["step"], got["loss"], want["loss"])
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=1e-5), (got["step"], got["grad_norm"])
    weights = final_weights(run)
    assert weights.keys() == ref_weights.keys()
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "source,target",
    [
        ("tp2xpp2", "1"),
        ("tp2xpp2", "pp2"),
        ("tp2xpp2", "tp2"),
        ("tp2xpp2", "dp2-distopt"),
        ("dp2-distopt", "tp2"),
        ("dp2-distopt", "dp4-distopt"),
        ("tp2xdp2-distopt", "tp2"),
        ("tp2xpp2", "tp2xdp2-distopt"),
        ("tp2xpp2", "pp2-interleaved"),
        ("dp2-distopt", "pp2-gpipe"),
        ("tp2xpp2", "pp2xdp2-zero-bubble"),
        ("tp2xpp2", "cp2xtp2"),
        ("tp2xpp2", "cp2xdp2-distopt"),  # ZeRO shards over dp x cp
        ("tp2xpp2", "dp2-zero2"),  # ZeRO-2: the same optimizer slices as ZeRO-1
        # between engines: DeepSpeed's fp32 partitions and moments are slices of the same global tensors
        ("tp2xpp2", "ds-zero3-dp4"),
        ("ds-zero3-dp2", "tp2xpp2"),
        ("dp2-distopt", "ds-zero3-nvme"),  # loaded into what DeepSpeed swaps to and from the drive
    ],
)
def test_resume_in_another_layout(tmp_path, corpus, uninterrupted, saved, source, target):
    skip_without_async_io(LAYOUTS[target][1])
    run = tmp_path / "run"
    resume_from(saved[source], run)
    done = run_layout(run, corpus, target)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continues(run, uninterrupted, 4)


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory, corpus):
    """gpt2 (tied embeddings): one process's metrics, and step-3 checkpoints of tp2 x pp2 and of dp2 with ZeRO-1."""
    ref = tmp_path_factory.mktemp("gpt2-ref") / "run"
    done = run_layout(ref, corpus, "1", arch="gpt2")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = {}
    for layout in ("tp2xpp2", "dp2-distopt"):
        run = tmp_path_factory.mktemp(f"gpt2-src-{layout}") / "run"
        done = run_layout(run, corpus, layout, arch="gpt2")
        assert done.returncode == 0, done.stderr[-3000:]
        saved[layout] = run / "checkpoints" / "step_0000003"
    return (read_metrics(ref), final_weights(ref)), saved


@pytest.mark.parametrize(
    "source,target",
    [("tp2xpp2", "1"), ("tp2xpp2", "dp2-distopt"), ("dp2-distopt", "pp2"), ("tp2xpp2", "pp2xdp2-distopt")],
)
def test_gpt2_resumes_in_another_layout(tmp_path, corpus, gpt2_runs, source, target):
    """The tied flavour through save and resume across layouts: the embedding's copy on the last stage and its
    Adam states (with ZeRO-1, their slices) are split from, and joined into, the one stored tensor."""
    uninterrupted, saved = gpt2_runs
    run = tmp_path / "run"
    resume_from(saved[source], run)
    done = run_layout(run, corpus, target, arch="gpt2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continues(run, uninterrupted, 4)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, corpus):
    """MoE: one process's metrics and weights, and the step-3 checkpoint of EP 2 x DP 2 with ZeRO-1."""
    ref = tmp_path_factory.mktemp("moe-ref") / "run"
    done = run_layout(ref, corpus, "1", **MOE)
    assert done.returncode == 0, done.stderr[-3000:]
    src = tmp_path_factory.mktemp("moe-src") / "run"
    done = run_layout(src, corpus, "ep2xdp2-distopt", **MOE)
    assert done.returncode == 0, done.stderr[-3000:]
    return (read_metrics(ref), final_weights(ref)), src / "checkpoints" / "step_0000003"


@pytest.mark.parametrize("target", ["1", "ep4", "pp2"])
def test_experts_resume_across_expert_parallel_sizes(tmp_path, corpus, moe_runs, target):
    """Expert weights are stored whole ([experts, ...]), each EP rank's block at its offset, with their Adam
    slices and the routers' selection biases: an EP 2 checkpoint continues at EP 1, EP 4 and under PP."""
    uninterrupted, step_dir = moe_runs
    assert "state.layers.0.mlp.bias" in store.stored_shapes(step_dir)
    run = tmp_path / "run"
    resume_from(step_dir, run)
    done = run_layout(run, corpus, target, **MOE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continues(run, uninterrupted, 4)


def all_tensors(step_dir):
    shapes = store.stored_shapes(step_dir)
    out = {k: torch.empty(s) for k, s in shapes.items() if not k.startswith("rng.")}
    store.read_shards(step_dir, out)
    return out


def test_async_save_equals_sync(tmp_path, corpus):
    states = {}
    for mode in ("false", "true"):
        run = tmp_path / mode
        done = run_layout(run, corpus, "dp2-distopt", **{"checkpoint.async": mode, "train.steps": 3})
        assert done.returncode == 0, done.stderr[-3000:]
        if mode == "true":
            assert "training blocked" in done.stdout and "async, written in" in done.stdout
        states[mode] = all_tensors(run / "checkpoints" / "step_0000003")
    assert states["true"].keys() == states["false"].keys()
    assert any(k.startswith("optim.exp_avg_sq.") for k in states["true"])
    for key, value in states["false"].items():
        assert torch.equal(states["true"][key], value), key


def test_async_save_is_its_steps_state_while_training_goes_on(tmp_path, corpus):
    """An async save is written while the next steps change the weights: what it writes must still be the state
    of the step it names, bit for bit what a sync run saved at that step. slowsave holds step 2's writer back
    until training waits on it (step 4's save); rank 0's output shows that steps 3 and 4 trained before the write
    was committed."""
    sets = {"train.steps": 6, "checkpoint.interval": 2, "checkpoint.keep": 0}
    sync = run_layout(tmp_path / "false", corpus, "dp2-distopt", **{"checkpoint.async": "false", **sets})
    env = {**os.environ, "MEGATRONLITE_FAULT": "slowsave:2"}
    held = run_layout(tmp_path / "true", corpus, "dp2-distopt", env=env, **{"checkpoint.async": "true", **sets})
    for done in (sync, held):
        assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 prints these in this order only if steps 3 and 4 ran while step 2's write was pending
    events = ["checkpoint step 2: training blocked", "step 3/6 |", "step 4/6 |", "step_0000002 (async, written in"]
    at = [held.stdout.find(e) for e in events]
    assert -1 not in at and at == sorted(at), held.stdout[-3000:]
    names = ["step_0000002", "step_0000004", "step_0000006"]
    assert sorted(p.name for p in (tmp_path / "true" / "checkpoints").glob("step_*")) == names
    for name in names:
        saved, reference = tmp_path / "true" / "checkpoints" / name, tmp_path / "false" / "checkpoints" / name
        got, want = all_tensors(saved), all_tensors(reference)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)
        for key in ("step", "consumed_samples"):
            assert store.read_meta(saved)[key] == store.read_meta(reference)[key], (name, key)


@pytest.mark.parametrize("is_async", ["false", "true"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, corpus, uninterrupted, is_async):
    run = tmp_path / "run"
    env = {**os.environ, "MEGATRONLITE_FAULT": "save:6@0"}
    done = run_layout(run, corpus, "tp2", env=env, **{"checkpoint.async": is_async})
    assert done.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000003"
    assert not (ckpts / "step_0000006").exists()
    assert (ckpts / ".tmp-step_0000006").exists()  # the half-written save, never committed
    (run / "metrics.jsonl").unlink()
    done = run_layout(run, corpus, "tp2")  # load: auto
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continues(run, uninterrupted, 4)
    assert not (ckpts / ".tmp-step_0000006").exists()
    assert (ckpts / "latest").read_text() == "step_0000006"


def test_keep_every_retains_milestones(tmp_path, corpus):
    run = tmp_path / "run"
    done = run_layout(run, corpus, "1", **{"checkpoint.interval": 1, "checkpoint.keep": 2, "checkpoint.keep_every": 2})
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_0000002", "step_0000004", "step_0000005", "step_0000006"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "megatronlite", *args], capture_output=True, text=True, timeout=120)


def test_shape_mismatch_lists_tensors(tmp_path, corpus, saved):
    run = tmp_path / "run"
    resume_from(saved["tp2xpp2"], run)
    sets = overrides(corpus, run, **{"model.hidden_size": 128})
    done = cli("train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets))
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "does not match the model config" in err[0]
    assert "model.embedding.word.weight is [257, 64], config needs [257, 128]" in err[0]


def test_missing_and_corrupt_checkpoints(tmp_path, corpus, saved):
    broken = tmp_path / "broken"
    shutil.copytree(saved["tp2xpp2"], broken)
    (broken / ".metadata").write_bytes(b"garbage")
    for path, message in ((tmp_path / "nope", "does not exist"), (broken, "DCP metadata is missing or unreadable")):
        run = tmp_path / f"run-{path.name}"
        sets = overrides(corpus, run, **{"checkpoint.load": str(path)})
        done = cli("train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets))
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr


def test_metadata_never_unpickles_arbitrary_objects(tmp_path, saved):
    import pickle

    evil = tmp_path / "evil"
    shutil.copytree(saved["tp2xpp2"], evil)
    (evil / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(Exception, match="not allowed"):
        store.stored_shapes(evil)


def write_through_sharded_tensors(src: Path, dst: Path) -> None:
    """(A process of its own, a world of one.) Rewrite checkpoint `src` as megatronlite wrote checkpoints before
    it had a DCP planner of its own: a tensor stored in chunks as a ShardedTensor with those chunks, built with
    torch's private constructor, any other tensor plain."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    state = {}
    for key, md in read_dcp_metadata(src).state_dict_metadata.items():
        full = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        store.read_shards(src, full)
        if len(md.chunks) == 1:
            state[key] = full[key]
            continue
        shards = []
        for chunk in md.chunks:
            box = full[key]
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
                box = box.narrow(dim, start, length)
            shards.append(Shard(box.clone(), ShardMetadata(list(chunk.offsets), list(chunk.sizes), "rank:0/cpu")))
        properties = TensorProperties(dtype=md.properties.dtype)
        global_md = ShardedTensorMetadata([shard.metadata for shard in shards], md.size, properties)
        state[key] = ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_md)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst)))
    for name in ("meta.json", "config.yaml"):
        shutil.copy(src / name, dst / name)
    dist.destroy_process_group()


def _chunks(md) -> list[tuple]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)


def test_checkpoints_written_through_sharded_tensors_still_load(tmp_path, corpus, uninterrupted, saved):
    """Earlier versions stored partial tensors as ShardedTensors: the same kind of DCP metadata (tensors in
    chunks) as our planner writes, so such a checkpoint resumes, here into ZeRO-1 slices."""
    sharded = pytest.importorskip("torch.distributed._shard.sharded_tensor")
    if not hasattr(sharded.ShardedTensor, "_init_from_local_shards_and_global_metadata"):
        pytest.skip("this torch cannot build the ShardedTensors earlier versions saved")
    src, old = saved["tp2xpp2"], tmp_path / "old" / saved["tp2xpp2"].name
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, __file__, str(src), str(old)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = (read_dcp_metadata(d).state_dict_metadata for d in (src, old))
    assert ours.keys() == theirs.keys()
    assert any(len(md.chunks) > 1 for md in ours.values())
    for key, md in ours.items():
        assert type(theirs[key]) is type(md) and theirs[key].size == md.size, key
        assert _chunks(theirs[key]) == _chunks(md), key
    run = tmp_path / "run"
    resume_from(old, run)
    done = run_layout(run, corpus, "dp2-distopt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_continues(run, uninterrupted, 4)


SAME_LAYOUT_RESUMES = [
    (arch, layout) for arch in ("llama", "gpt2") for layout in ("pp2-interleaved", "pp2-gpipe", "pp2xdp2-zero-bubble")
] + [("llama", "pp2"), ("gpt2", "pp2"), ("gpt2", "tp2xpp2")]


@pytest.mark.parametrize("arch,layout", SAME_LAYOUT_RESUMES)
def test_every_schedule_resumes_bit_exact(tmp_path, corpus, arch, layout):
    """Save at step 3 and resume in the same layout, under each pipeline schedule: the same bits as not stopping.

    gpt2 ties the output layer to the embedding; under PP the last stage holds a copy whose Adam states must come
    back too (they were once skipped, and the resumed losses drifted: 4.6214 against 4.5618 at step 5)."""
    ref = tmp_path / "ref"
    done = run_layout(ref, corpus, layout, arch=arch)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    resume_from(ref / "checkpoints" / "step_0000003", run)
    done = run_layout(run, corpus, layout, arch=arch)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = read_metrics(run), read_metrics(ref)
    assert [m["step"] for m in got] == [4, 5, 6]
    assert [(m["loss"], m["grad_norm"]) for m in got] == [(m["loss"], m["grad_norm"]) for m in want[3:]]
    final, expected = (all_tensors(r / "checkpoints" / "step_0000006") for r in (run, ref))
    assert final.keys() == expected.keys()
    for key, value in expected.items():  # weights and Adam states, bit for bit
        assert torch.equal(final[key], value), key


if __name__ == "__main__":
    write_through_sharded_tensors(Path(sys.argv[1]), Path(sys.argv[2]))
