"""ZeRO-1 checkpoints are saved in place: each rank writes its own slices of the Adam states as chunks of the global
tensors, every element once, without gathering anything to full size.

The pure functions (a flat slice as boxes of global tensors) are checked against brute force; the planners on one
process; a dp4 save with the distributed optimizer runs as 4 gloo processes under torchrun (this file is also their
script), which record the tensor bytes the save allocated and the full states gathered the way saves used to.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, tiny_overrides
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatronlite.checkpoint import store
from megatronlite.checkpoint.staging import PieceStager
from megatronlite.checkpoint.views import GlobalPiece, flat_boxes, slice_pieces, tensor_pieces
from megatronlite.models.init import part_name
from megatronlite.parallel.mesh import ROLES, Group, Mesh
from megatronlite.parallel.sharding import Sharding, tp_split
from megatronlite.untrusted import read_dcp_metadata

REPO = Path(__file__).resolve().parents[1]
ADAM = ("exp_avg", "exp_avg_sq")


def _box(tensor: torch.Tensor, offset, shape) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offset, shape)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def test_flat_ranges_become_contiguous_boxes_in_memory_order():
    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        n = math.prod(shape)
        start = rng.randint(0, n)
        end = rng.randint(start, n)
        boxes = flat_boxes(start, end, shape)
        assert len(boxes) <= 2 * len(shape) - 1
        index = torch.arange(n).view(shape)
        covered = []
        for offset, size in boxes:
            values = _box(index, offset, size).reshape(-1).tolist()
            assert values == list(range(values[0], values[0] + len(values))), (shape, start, end)  # contiguous
            covered += values
        assert covered == list(range(start, end)), (shape, start, end, boxes)


def _mesh(tp: int, rank: int) -> Mesh:
    roles = {role: Group() for role in ROLES}
    roles["tensor"] = Group(tp, rank, tuple(range(tp)))
    return Mesh(world_size=tp, rank=rank, roles=roles)


def test_slices_of_tp_shards_with_fused_parts_and_padding_are_views_of_global_boxes():
    """Every element of a flat slice of a local (TP-sharded, fused, padded) tensor lands in its global tensor's
    place, padding nowhere; the pieces are views of the flat slice."""
    rng = random.Random(1)
    for _ in range(400):
        ndim, tp = rng.randint(1, 3), rng.choice([1, 2, 4])
        dim, parts = rng.randrange(ndim), rng.choice([(), ("gate", "up"), ("q", "k", "v")])
        shape = [rng.randint(1, 6) for _ in range(ndim)]
        padded = None
        if rng.random() < 0.4:
            padded = -(-(shape[dim] + rng.randint(0, 3)) // tp) * tp
        else:
            shape[dim] = -(-shape[dim] // tp) * tp
        spec = tp_split(tuple(shape), dim, parts, padded)
        names = [part_name("w", p) for p in spec.part_names()]
        full = {n: torch.arange(math.prod(shape)).view(shape) + 1 + 1000 * i for i, n in enumerate(names)}  # 0: pad
        for r in range(tp):
            local = torch.cat([spec.local_slice(full[n], r, tp) for n in names], dim=dim)
            start = rng.randint(0, local.numel())
            flat = local.reshape(-1)[start : rng.randint(start, local.numel())].clone()
            pieces = slice_pieces("w", flat, start, tuple(local.shape), spec, _mesh(tp, r))
            for piece in pieces:
                assert piece.local.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                assert torch.equal(piece.local, _box(full[piece.key], piece.offset, piece.local.shape))
            assert sum(p.local.numel() for p in pieces) == int((flat != 0).sum())
            whole = tensor_pieces("w", local, spec, _mesh(tp, r))
            assert sum(p.local.numel() for p in whole) == int((local != 0).sum())


def test_pieces_round_trip_through_dcp_in_any_boxes(tmp_path):
    """One process saves a tensor as three boxes (one key, several chunks on a rank) and a plain tensor; the
    metadata is DCP's usual kind; loading into other boxes reads the overlaps."""
    value = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
    flat = value.reshape(-1)[7:23]
    saved = slice_pieces("optim.exp_avg.w", flat, 7, (6, 5), Sharding((6, 5)), Mesh())
    assert [p.offset for p in saved] == [(1, 2), (2, 0), (4, 0)]
    boxes = {(0, 0): value[:1], (1, 0): value[1:2, :2], (4, 3): value[4:5, 3:], (5, 0): value[5:]}
    rest = [GlobalPiece("optim.exp_avg.w", box, (6, 5), offset) for offset, box in boxes.items()]
    store.write_shards(tmp_path, {"rng": torch.arange(3, dtype=torch.uint8)}, saved + rest)
    md = read_dcp_metadata(tmp_path).state_dict_metadata["optim.exp_avg.w"]
    assert type(md).__name__ == "TensorStorageMetadata" and tuple(md.size) == (6, 5) and len(md.chunks) == 7
    out = torch.zeros(6, 5)
    plain = {"rng": torch.zeros(3, dtype=torch.uint8)}
    store.read_shards(tmp_path, plain, [GlobalPiece("optim.exp_avg.w", out[:, 1:4], (6, 5), (0, 1))])
    assert torch.equal(out[:, 1:4], value[:, 1:4]) and not out[:, 0].any() and not out[:, 4].any()
    assert torch.equal(plain["rng"], torch.arange(3, dtype=torch.uint8))


# --- a dp4 save with the distributed optimizer, in 4 processes ------------------------------------------------------


class Allocations(TorchDispatchMode):
    """Bytes of every new floating-point tensor storage an aten op makes while active (a view or an in-place
    result shares its input's storage and is not counted): what a save copies or gathers."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def gathered_states(trainer) -> dict[str, torch.Tensor]:
    """Every Adam state at full size, all-gathered over the grad group the way ZeRO-1 saves used to (tp1: a local
    parameter is its global tensor), keyed like the checkpoint."""
    import torch.distributed as dist

    out = {}
    name_of = {id(p): n for n, p in trainer.params.items()}
    for bucket in trainer.engine.dp.buckets:
        lo, hi = bucket.shard_range
        base = bucket.param_buf.data_ptr()
        for key in ADAM:
            mine = torch.zeros(hi - lo)
            for o in bucket.owned:
                at = (o.shard.data_ptr() - base) // o.shard.element_size() - lo
                mine[at : at + o.shard.numel()] = trainer.engine.optimizer.state[o.shard][key]
            full = torch.empty_like(bucket.grad_buf)
            dist.all_gather_into_tensor(full, mine, group=trainer.engine.dp.group.pg)
            for p in bucket.params:
                start = (p.data_ptr() - base) // p.element_size()
                value = full[start : start + p.numel()].view_as(p)
                for piece in tensor_pieces(name_of[id(p)], value, p.sharding, trainer.mesh):
                    out[f"optim.{key}.{piece.key}"] = piece.local.clone()
    return out


def worker(corpus: str, out: Path) -> None:
    """(One of 4 processes.) Train 2 steps at dp4 with the distributed optimizer, counting what the step-2 save
    allocates; then record the full states (rank 0) and this rank's allocations and sizes."""
    import torch.distributed as dist

    from megatronlite import config as config_mod
    from megatronlite.parallel.mesh import build_mesh, init_distributed
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    world, rank, _ = init_distributed("cpu", 2)
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    sets = {"parallel.distributed_optimizer": "true", "train.steps": 2, "train.global_batch_size": 8}
    cfg = config_mod.load(str(REPO / "configs/demo.yaml"), tiny_overrides(corpus, run, **sets) + ["train.device=cpu"])
    trainer = Trainer(cfg, run, build_mesh(cfg, world, rank), torch.device("cpu"))
    saves = []
    save = checkpointing.Checkpointer.save

    def counted(self) -> None:
        with Allocations() as allocations:
            save(self)
        saves.append(allocations.sizes)

    checkpointing.Checkpointer.save = counted
    trainer.run()
    shard_bytes = sum(b.grad_shard.numel() * b.grad_shard.element_size() for b in trainer.engine.dp.buckets)
    weight_bytes = sum(p.numel() * p.element_size() for p in trainer.params.values())
    stager = PieceStager(pin_memory=False)  # what an async save reserves at start-up
    stager.reserve(trainer.state_tensors(True))
    staged_bytes = sum(b.nbytes for b in stager.buffers.values())
    record = {"sizes": saves[0], "shard_bytes": shard_bytes, "weight_bytes": weight_bytes, "staged": staged_bytes}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    states = gathered_states(trainer)
    if rank == 0:
        torch.save(states, out / "gathered.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp4_save(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("dp4-distopt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        f"--master-port={free_port()}",
        __file__,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, corpus, str(out)], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


def _chunks_tile(size: tuple[int, ...], chunks) -> bool:
    """Every element of a tensor of `size` is in exactly one chunk."""
    count = torch.zeros(size, dtype=torch.int32)
    for c in chunks:
        _box(count, c.offsets, c.sizes).add_(1)
    return bool((count == 1).all())


@pytest.mark.slow
def test_zero_save_writes_each_adam_element_once_from_its_owner(dp4_save):
    """Every element of every stored tensor is in exactly one chunk (the Adam states' chunks written by the ranks
    that own them, the replicated weights deduplicated), and the Adam states are the run's, gathered."""
    step_dir = dp4_save / "run" / "checkpoints" / "step_0000002"
    md = read_dcp_metadata(step_dir)
    for key, tensor_md in md.state_dict_metadata.items():  # weights replicated on every rank: written once too
        assert type(tensor_md).__name__ == "TensorStorageMetadata", key
        assert _chunks_tile(tuple(tensor_md.size), tensor_md.chunks), key
    optim = {k: v for k, v in md.state_dict_metadata.items() if k.startswith("optim.")}
    assert {k.split(".")[1] for k in optim} == set(ADAM)
    assert any(len(v.chunks) > 1 for v in optim.values())  # a state split between ranks
    files = {info.relative_path for index, info in md.storage_data.items() if index.fqn.startswith("optim.")}
    assert len(files) == 4  # every rank wrote its own slices
    gathered = torch.load(dp4_save / "gathered.pt", weights_only=True)
    assert gathered.keys() == optim.keys()
    stored = {k: torch.empty(tuple(v.size)) for k, v in optim.items()}
    store.read_shards(step_dir, stored)
    for key, value in gathered.items():
        assert torch.equal(stored[key], value), key


@pytest.mark.slow
def test_zero_save_allocates_no_full_size_state(dp4_save):
    """What a save allocates, and what an async save stages, is bounded by what the rank holds (its weights, its
    shard of each Adam state): no tensor the size of a full state, as gathering made (the whole bucket)."""
    for rank in range(4):
        record = json.loads((dp4_save / f"rank{rank}.json").read_text())
        sizes, shard = record["sizes"], record["shard_bytes"]
        held = record["weight_bytes"] + len(ADAM) * shard
        assert max(sizes, default=0) <= shard, (rank, max(sizes), shard)
        assert sum(sizes) <= held, (rank, sum(sizes), record)
        assert record["staged"] <= held, (rank, record["staged"], held)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
