"""Each TP layer on 2 gloo processes against the plain layer on the full tensors, forward and backward."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port

from megatronlite.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from megatronlite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatronlite.parallel.mappings import sequence_shard
from megatronlite.parallel.mesh import AXES, ROLES, _lines, build_mesh, rank_grid
from megatronlite.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

TP = 2


def _fill(layer, seed):
    """Give each param the TP slice of random full tensors (one per fused part); return the full tensors."""
    gen = torch.Generator().manual_seed(seed)
    full = {}
    for name, p in layer.named_parameters():
        spec = p.sharding
        parts = [torch.randn(spec.global_shape, generator=gen) for _ in spec.part_names()]
        dim = spec.dim or 0
        full[name] = torch.cat(parts, dim=dim)
        with torch.no_grad():
            p.copy_(torch.cat([spec.local_slice(t, dist.get_rank(), TP) for t in parts], dim=dim))
    return full


def _worker(rank, port, sequence_parallel, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        cfg = Config(
            model=ModelConfig(num_heads=4),
            parallel=ParallelConfig(tensor=TP),
            train=TrainConfig(global_batch_size=4, micro_batch_size=4),
        )
        mesh = build_mesh(cfg, TP, rank)
        # the DeviceMesh is over the same groups the roles hand out
        assert mesh.device_mesh.mesh_dim_names == AXES and mesh.device_mesh.get_group("tp") is mesh.tp_group
        assert tuple(mesh.device_mesh.get_coordinate()) == (0, 0, 0, rank)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, 16, generator=g)  # [batch, seq, hidden]; an SP shard is 1.5 sequences' tokens
        x_local = sequence_shard(x, rank, TP) if sequence_parallel else x
        x_local = x_local.clone().requires_grad_()
        ref_x = x.clone().requires_grad_()

        # column (two fused parts) then row: the Megatron MLP pattern
        col = ColumnParallelLinear(16, 24, mesh, bias=True, parts=("a", "b"), sequence_parallel=sequence_parallel)
        row = RowParallelLinear(12, 16, mesh, bias=True, sequence_parallel=sequence_parallel)
        fc = _fill(col, 1)
        fr = _fill(row, 2)
        a, b = col(x_local).chunk(2, dim=-1)
        y = row(a * b)
        wa, wb = fc["weight"].chunk(2)
        ba, bb = fc["bias"].chunk(2)
        ref = F.linear(F.linear(ref_x, wa, ba) * F.linear(ref_x, wb, bb), fr["weight"], fr["bias"])
        ref_local = sequence_shard(ref, rank, TP) if sequence_parallel else ref
        torch.testing.assert_close(y, ref_local, rtol=1e-5, atol=1e-5)
        y.pow(2).sum().backward()
        ref.pow(2).sum().backward()
        grad_ref = sequence_shard(ref_x.grad, rank, TP) if sequence_parallel else ref_x.grad
        torch.testing.assert_close(x_local.grad, grad_ref, rtol=1e-4, atol=1e-4)
        w_grad_ref = torch.cat([g.chunk(TP)[rank] for g in _ref_grads_column(ref_x.detach(), fc, fr)])
        torch.testing.assert_close(col.weight.grad, w_grad_ref, rtol=1e-4, atol=1e-4)

        # vocabulary-parallel embedding and cross-entropy, with padding (vocab 250 -> 256)
        emb = VocabParallelEmbedding(250, 256, 16, mesh, sequence_parallel=sequence_parallel)
        fe = _fill(emb, 3)
        ids = torch.randint(0, 250, (3, 8), generator=g)
        out = emb(ids)
        ref_out = F.embedding(ids, fe["weight"])
        torch.testing.assert_close(out, sequence_shard(ref_out, rank, TP) if sequence_parallel else ref_out)
        logits_full = torch.randn(3, 8, 256, generator=g)
        logits_full[..., 250:] = 100.0  # padding columns must not count
        logits = logits_full.chunk(TP, dim=-1)[rank].clone().requires_grad_()
        target = torch.randint(0, 250, (3, 8), generator=g)
        loss = vocab_parallel_cross_entropy(logits, target, 250, mesh)
        ref_logits = logits_full[..., :250].clone().requires_grad_()
        ref_loss = F.cross_entropy(ref_logits.reshape(-1, 250), target.reshape(-1), reduction="none").view(3, 8)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        loss.sum().backward()
        ref_loss.sum().backward()
        grad_full = torch.cat([ref_logits.grad, torch.zeros(3, 8, 6)], dim=-1)
        torch.testing.assert_close(logits.grad, grad_full.chunk(TP, dim=-1)[rank], rtol=1e-5, atol=1e-6)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def _ref_grads_column(x, fc, fr):
    """d/dW of the reference MLP for the two fused parts of the column weight."""
    wa, wb = (w.clone().requires_grad_() for w in fc["weight"].chunk(2))
    ba, bb = fc["bias"].chunk(2)
    out = F.linear(F.linear(x, wa, ba) * F.linear(x, wb, bb), fr["weight"], fr["bias"])
    out.pow(2).sum().backward()
    return wa.grad, wb.grad


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_layers_match_full_layers(sequence_parallel):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, sequence_parallel, errors)) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    messages = [] if errors.empty() else [errors.get()]
    assert all(p.exitcode == 0 for p in procs) and not messages, messages


def test_rank_grid_tp_then_cp_innermost():
    grid = rank_grid(16, tp=2, pp=2, cp=2)  # dims: pp, dp, cp, tp
    assert grid.shape == (2, 2, 2, 2)
    assert grid[0, 0, 0].tolist() == [0, 1]  # a TP group: consecutive ranks, one node
    assert grid[0, 0, :, 0].tolist() == [0, 2]  # a CP group: next innermost
    assert grid[0, :, 0, 0].tolist() == [0, 4]  # a DP group
    assert grid[:, 0, 0, 0].tolist() == [0, 8]  # a pipeline: outermost


def test_roles_span_their_axes():
    """Each role's groups, on a 16-rank grid pp2 x dp2 x cp2 x tp2: ranks that differ only along its axes,
    ascending (so a rank's index in its line is its rank in torch's group)."""
    grid = rank_grid(16, tp=2, pp=2, cp=2)
    assert _lines(grid, ROLES["tensor"])[:2] == [[0, 1], [2, 3]]
    assert _lines(grid, ROLES["context"])[:2] == [[0, 2], [1, 3]]
    assert _lines(grid, ROLES["batch"])[:2] == [[0, 4], [1, 5]]
    assert _lines(grid, ROLES["pipeline"])[:2] == [[0, 8], [1, 9]]
    grad = _lines(grid, ROLES["grad"])  # dp x cp: the ranks with the same parameters and different tokens
    assert grad == _lines(grid, ("cp", "dp")) and grad[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert sorted(r for line in grad for r in line) == list(range(16)) and all(line == sorted(line) for line in grad)
    assert _lines(grid, ()) == [[r] for r in range(16)] and AXES == ("pp", "dp", "cp", "tp")


def test_every_parameter_carries_its_per_axis_sharding():
    """The typed description each parameter is made with: split over TP (dim, parts, padding) or replicated,
    partial gradients over TP under sequence parallelism, and the tied output layer's alias."""
    from megatronlite.models.gpt import GPTModel, RunOptions
    from megatronlite.parallel.mesh import Group, Mesh
    from megatronlite.parallel.sharding import ShardedParameter, Sharding, Split

    roles = {r: Group() for r in ("pipeline", "context", "batch", "grad", "loss")}
    mesh = Mesh(world_size=2, roles={**roles, "tensor": Group(2, 0, (0, 1))})  # TP 2 (no collective runs here)
    cfg = ModelConfig(arch="gpt2", num_layers=1, hidden_size=16, num_heads=2, vocab_size=250, max_seq_len=8)
    model = GPTModel(cfg, mesh, pre_process=False, options=RunOptions(sequence_parallel=True))
    got = {name: p.sharding for name, p in model.named_parameters()}
    assert all(isinstance(p, ShardedParameter) for p in model.parameters())
    assert got["layers.0.attention.qkv.weight"].split("tp") == Split(0)
    assert got["layers.0.attention.proj.weight"].split("tp") == Split(1)
    proj_bias = got["layers.0.attention.proj.bias"]
    assert proj_bias.splits == () and proj_bias.partial_grad == ("tensor",)
    assert got["final_norm.weight"].split("dp") is None and got["final_norm.weight"].partial_grad == ("tensor",)
    out = got["output.weight"]  # the last stage's copy of the tied embedding
    assert out.alias == "embedding.word.weight" and out.split("tp") == Split(0, padded=cfg.padded_vocab_size(2))
    assert out.global_shape == (250, 16) and model.output.weight.shape == (cfg.padded_vocab_size(2) // 2, 16)
    llama = GPTModel(ModelConfig(num_layers=1, hidden_size=16, num_heads=2, ffn_hidden_size=32), mesh)
    fc1 = dict(llama.named_parameters())["layers.0.mlp.fc1.weight"].sharding
    assert fc1.split("tp") == Split(0, parts=("gate", "up")) and fc1.global_shape == (32, 16)
    torch.nn.init.normal_(model.output.weight)  # made uninitialised (init.py fills it): give it values to compare
    copied = copy.deepcopy(model.output.weight)
    assert copied.sharding == out and torch.equal(copied, model.output.weight)
    moe = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, moe=MoEConfig(num_experts=4, ffn_hidden_size=8))
    down = dict(GPTModel(moe).named_parameters())["layers.0.mlp.down"].sharding
    assert down.split("ep") == Split(0) and down.split("tp") is None and down.global_shape == (4, 16, 8)
    with pytest.raises(ValueError, match=r"splits over each of \('tp', 'ep'\) at most once, not over \['fsdp'\]"):
        Sharding((4, 4), (("fsdp", Split(0)),))  # no reader of the splits knows a sharded-DP axis yet
