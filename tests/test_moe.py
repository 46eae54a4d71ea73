"""The mixture-of-experts layer against a reference that loops over tokens, its losses, its balancing bias."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatronlite import config
from megatronlite.models import moe as moe_module
from megatronlite.models.counting import parameter_count
from megatronlite.models.gpt import GPTModel
from megatronlite.models.init import init_parameters
from megatronlite.models.moe import MoE, set_aux_loss_scale
from megatronlite.parallel.mesh import Mesh

H = 16


def moe_config(arch: str = "llama", **moe) -> config.ModelConfig:
    sets = [f"model.moe.{k}={v}" for k, v in {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 12, **moe}.items()]
    base = [f"model.arch={arch}", "model.num_layers=2", f"model.hidden_size={H}", "model.num_heads=2"]
    base += [
        "model.ffn_hidden_size=32",
        "model.max_seq_len=16",
        "train.seq_len=16",
        "model.make_vocab_size_divisible_by=1",
    ]
    return config.from_dict(config.apply_overrides({}, [*base, *sets])).model


def layer(cfg: config.ModelConfig, seed: int = 0) -> MoE:
    from megatronlite.models.gpt import OPS

    moe = MoE(cfg, Mesh(), False, dict.fromkeys(OPS, "torch"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return moe


def expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    if moe.cfg.gated:
        return (F.silu(x @ moe.gate[e].T) * (x @ moe.up[e].T)) @ moe.down[e].T
    return F.gelu(x @ moe.fc1[e].T, approximate="tanh") @ moe.fc2[e].T


def reference(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, int]:
    """Token by token, in order: its scores, its top k (an expert past `capacity` assignments refuses it)."""
    cfg = moe.cfg.moe
    out, taken, dropped = torch.zeros_like(x), [0] * cfg.num_experts, 0
    for t in range(x.shape[0]):
        logits = x[t].float() @ moe.router.float().T
        scores = logits.softmax(-1) if cfg.router == "softmax" else logits.sigmoid()
        choice = scores + (moe.bias if moe.bias is not None else 0)
        experts = choice.topk(cfg.top_k).indices.tolist()
        weights = scores[experts] / (scores[experts].sum() if cfg.normalize_top_k else 1) * cfg.scaling_factor
        for e, w in zip(experts, weights):
            if capacity is not None and taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            out[t] += w * expert(moe, e, x[t])
        if moe.shared is not None:
            shared = moe.shared.mlp(x[t])
            out[t] += shared if moe.shared.gate is None else shared * torch.sigmoid(x[t] @ moe.shared.gate[0])
    return out, dropped


@pytest.mark.parametrize(
    "moe",
    [
        {},
        {"router": "sigmoid", "normalize_top_k": "false", "scaling_factor": 2.5},
        {"shared_expert_ffn_hidden_size": 8, "shared_expert_gate": "true", "top_k": 1},
        {"router": "sigmoid", "bias_update_rate": 0.01},
    ],
    ids=["softmax", "sigmoid-scaled", "shared-gated", "sigmoid-bias"],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropless_layer_equals_a_loop_over_tokens(moe, arch):
    cfg = moe_config(arch, **moe)
    m = layer(cfg)
    if m.bias is not None:
        m.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    with torch.no_grad():
        m.router[3] = -50.0 * m.router[3].sign()  # expert 3 gets (almost surely) no token
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(1))
    got = m(x.clone())
    want, _ = reference(m, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = m.take_stats()
    assert stats.tokens_per_expert.sum() == 24 * cfg.moe.top_k and stats.dropped == 0


def grouped_and_looped(monkeypatch, ffn: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(grouped, looped) pairs of a bf16 MoE layer's output and gradients: its experts run once as the device's
    one grouped GEMM (on the CPU, torch's version of it, which checks the same strides) and once one GEMM per
    expert; an expert without tokens among them. Asserts the grouped GEMM ran where the sizes allow it."""
    cfg = moe_config(ffn_hidden_size=ffn)
    x = torch.randn(24, H, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    grouped_mm = torch._grouped_mm

    def run(grouped: bool) -> list[torch.Tensor]:
        m = layer(cfg).bfloat16().to(device)
        with torch.no_grad():
            m.router[3] = -50.0 * m.router[3].sign()  # expert 3 gets (almost surely) no token
        monkeypatch.setattr(moe_module, "has_grouped_mm", lambda rows: grouped and rows.dtype == torch.bfloat16)
        calls = []
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
        x_ = x.clone().requires_grad_()
        out = m(x_)
        out.float().square().sum().backward()
        assert bool(calls) == (grouped and ffn % 8 == 0)
        return [out, x_.grad, *(p.grad for p in m.parameters())]

    return list(zip(run(True), run(False)))


@pytest.mark.parametrize("ffn", [16, 12], ids=["aligned", "unaligned"])
def test_grouped_gemm_path_equals_one_gemm_per_expert(monkeypatch, ffn):
    """An expert width of 12 (24 bytes) is one torch._grouped_mm refuses: the layer keeps one GEMM per expert."""
    for grouped, looped in grouped_and_looped(monkeypatch, ffn, "cpu"):
        torch.testing.assert_close(grouped, looped, rtol=0, atol=0)
    weights = torch.zeros(1 + 2 * ffn * H, dtype=torch.bfloat16)
    assert moe_module.grouped_mm_takes([weights[:-1].view(2, ffn, H)]) == (ffn % 8 == 0)
    assert not moe_module.grouped_mm_takes([weights[1:].view(2, ffn, H)])  # 2 bytes past a 16-byte boundary


def test_capacity_drops_the_latest_assignments_and_counts_them():
    cfg = moe_config(capacity_factor=0.5)
    m = layer(cfg)
    x = torch.randn(20, H, generator=torch.Generator().manual_seed(2))
    got = m(x)
    capacity = math.ceil(0.5 * 20 * 2 / 4)
    want, dropped = reference(m, x, capacity)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = m.take_stats()
    assert dropped > 0 and stats.dropped == dropped
    assert stats.tokens_per_expert.max() <= capacity


def test_the_selection_bias_moves_the_load_towards_balance():
    m = layer(moe_config(router="sigmoid", bias_update_rate=0.02, num_experts=8, top_k=2))
    x = torch.randn(256, H, generator=torch.Generator().manual_seed(3)) + 1.0
    with torch.no_grad():
        m.router[0] = 0.5  # expert 0 scores near 1 for every token: it gets every token

    def imbalance() -> float:
        m(x)
        counts = m.take_stats().tokens_per_expert.float()
        return (counts.max() / counts.mean()).item()

    before = imbalance()
    for _ in range(60):
        m(x)
        m.update_bias(m.take_stats().tokens_per_expert)
    after = imbalance()
    assert before > 2.0 and after < 0.6 * before, (before, after)


def test_auxiliary_losses_reach_the_router_with_the_micro_batch_scale():
    m = layer(moe_config(aux_loss_coeff=0.1, z_loss_coeff=0.01))
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(4))

    def router_grad(scale: float) -> torch.Tensor:
        m.zero_grad()
        set_aux_loss_scale(scale)
        try:
            m(x).sum().backward()
        finally:
            set_aux_loss_scale(1.0)
        return m.router.grad.clone()

    got, without = router_grad(0.25), router_grad(0.0)
    m.zero_grad()  # the losses written out from their definitions, their gradient scaled as the layer scales it
    logits = x @ m.router.T
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4).float()
    balance = 4 * (probs.mean(0) * counts / counts.sum()).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    (0.25 * (0.1 * balance + 0.01 * z)).backward()
    torch.testing.assert_close(got - without, m.router.grad, rtol=1e-3, atol=1e-5)
    assert m.router.grad.abs().max() > 1e-4  # the losses do move the router


def test_global_balance_shares_are_the_running_mean_over_the_step_and_recompute_reuses_them():
    """aux_loss_scope global: a micro-batch's balance loss weighs the assignments of the step's micro-batches so
    far (Megatron's global_aux_loss); a recomputing forward uses what its first forward used."""
    m = layer(moe_config(aux_loss_coeff=0.1, aux_loss_scope="global"))
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, H, generator=gen) + shift for shift in (0.0, 1.0)]  # the second skewed
    probs = [(x @ m.router.T).softmax(-1) for x in xs]
    counts = [torch.bincount(p.topk(2).indices.reshape(-1), minlength=4).float() for p in probs]

    def balance(p: torch.Tensor, c: torch.Tensor) -> float:
        return (4 * (p.mean(0) * c / c.sum()).sum()).item()

    m.start_step()
    for x in xs:
        m(x)
    got = m.take_stats().aux_loss.item()
    want = balance(probs[0], counts[0]) + balance(probs[1], counts[0] + counts[1])
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    assert not math.isclose(got, balance(probs[0], counts[0]) + balance(probs[1], counts[1]), rel_tol=1e-3)
    with moe_module.uncounted():  # full recompute's second forwards, in the order the first ones ran
        assert torch.equal(m._balance_shares(counts[0].long()), counts[0] / counts[0].sum())
        assert torch.equal(m._balance_shares(counts[1].long()), (counts[0] + counts[1]) / (counts[0] + counts[1]).sum())
    m.start_step()
    m(xs[1])
    assert math.isclose(m.take_stats().aux_loss.item(), balance(probs[1], counts[1]), rel_tol=1e-5)


@pytest.mark.parametrize(
    "moe",
    [{}, {"layer_freq": 2, "shared_expert_ffn_hidden_size": 8, "shared_expert_gate": "true"}, {"layer_freq": "[0, 1]"}],
)
def test_parameter_count_counts_every_expert(moe):
    cfg = moe_config(**moe)
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_a_model_with_experts_trains_its_router():
    cfg = moe_config(aux_loss_coeff=0.01)
    model = GPTModel(cfg)
    init_parameters(model, cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, ids).backward()
    assert model.layers["0"].mlp.router.grad.abs().sum() > 0 and model.layers["1"].mlp.down.grad.abs().sum() > 0


@pytest.mark.parametrize("world, sets", [(8, ["parallel.pipeline=2", "parallel.context=2"]), (8, []), (4, [])])
@pytest.mark.parametrize("ep", [2, 4])
def test_expert_groups_are_carved_out_of_dp_x_cp(world, sets, ep):
    """Each EP group is `ep` of the ranks that share the gradients (dp x cp); the ranks holding the same experts
    (expert_grad) are the rest of them; the two cross in this rank alone."""
    from megatronlite.plan.layout import mesh_at

    moe = [f"model.moe.{k}={v}" for k, v in {"num_experts": 4, "ffn_hidden_size": 8}.items()]
    batch = ["train.micro_batch_size=1", "train.global_batch_size=64"]
    cfg = config.from_dict(config.apply_overrides({}, [*moe, *batch, *sets, f"parallel.expert={ep}"]))
    grad_size = world // cfg.parallel.pipeline
    if grad_size % ep:
        with pytest.raises(config.UserError, match="parallel.expert"):
            config.validate_layout(cfg, world)
        return
    for rank in range(world):
        mesh = mesh_at(cfg, world, rank)
        grad, expert, holders = (set(mesh.role(r).ranks) for r in ("grad", "expert", "expert_grad"))
        assert len(expert) == ep and len(holders) == grad_size // ep
        assert expert <= grad and holders <= grad and expert & holders == {rank}
        assert sorted(expert) == list(range(min(expert), min(expert) + ep))  # consecutive, cp fastest


@pytest.mark.parametrize(
    "moe, dp, micro, warned",
    [
        ({"aux_loss_coeff": 0.01, "aux_loss_scope": "global"}, 2, 2, True),
        ({"aux_loss_coeff": 0.01, "aux_loss_scope": "global"}, 2, 1, False),  # one micro-batch per rank
        ({"aux_loss_coeff": 0.01, "aux_loss_scope": "global"}, 1, 8, False),  # one process's running mean
        ({"aux_loss_coeff": 0.01}, 2, 2, False),
        ({"capacity_factor": 1.0}, 4, 4, False),  # drops are decided over whole micro-batches in every layout
    ],
)
def test_the_setting_that_makes_a_layout_train_another_model_is_named(moe, dp, micro, warned):
    cfg = config.from_dict({"model": {"moe": {"num_experts": 4, **moe}}}).model
    line = moe_module.layout_warning(cfg, dp, micro)
    assert (line is not None) == warned, line
    assert line is None or f"summed over the {dp} data-parallel ranks" in line
