"""FusedAdamW (torch and Triton updates) against torch.optim.AdamW over several steps.

Covers two param groups with different lr / weight decay, a tensor spanning several kernel blocks,
a parameter that misses a gradient on one step (its own step count), bf16 parameters stepped from
fp32 masters (the bf16 copy is poisoned before each step, so every element must be rewritten),
and a state_dict round trip that keeps the fp32 state.
"""

import pytest
import torch

from megatronlite.kernels import FusedAdamW, fused_adamw
from megatronlite.kernels.dispatch import triton_problem
from megatronlite.kernels.testing import TOLERANCES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP = triton_problem(DEVICE)
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(SKIP is not None, reason=f"triton cases skipped: {SKIP}")),
]
SHAPES = [(6, 7), (4096 + 9,), (3,)]  # the second spans two 4096-element blocks
HYPER = {"betas": (0.9, 0.95), "eps": 1e-8}


def groups(params):
    return [
        {"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0},
    ]


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        skip = step == 2 and i == 2  # no gradient this step: the optimizer must leave it (and its count) alone
        p.grad = None if skip else torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_torch_adamw(impl):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opt = fused_adamw(groups(ours), lr=1.0, impl=impl, **HYPER)
    ref = torch.optim.AdamW(groups(theirs), lr=1.0, foreach=False, **HYPER)
    for step in range(5):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [opt.state[p]["step"].item() for p in ours] == [5, 5, 4]


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_params_step_fp32_masters(impl):
    ours = make_params(torch.bfloat16)
    theirs = [p.detach().float().requires_grad_() for p in ours]
    opt = fused_adamw(groups(ours), lr=1.0, impl=impl, **HYPER)
    ref = torch.optim.AdamW(groups(theirs), lr=1.0, foreach=False, **HYPER)
    for step in range(4):
        set_grads(ours, step)
        for a, b in zip(ours, theirs):
            b.grad = None if a.grad is None else a.grad.float()
        if step > 0:  # masters exist: the bf16 copies of these (stepped every time) must be fully rewritten
            with torch.no_grad():
                for p in ours[:2]:
                    p.fill_(float("nan"))
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            master = opt.state[a]["master_param"]
            assert master.dtype == opt.state[a]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(master, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.float(), b, **TOLERANCES[torch.bfloat16])


def test_state_dict_round_trip_keeps_fp32_state():
    params = make_params(torch.bfloat16)
    opt = FusedAdamW(groups(params), **HYPER)
    set_grads(params, 0)
    opt.step()
    clone = [p.detach().clone().requires_grad_() for p in params]
    restored = FusedAdamW(groups(clone), **HYPER)
    restored.load_state_dict(opt.state_dict())
    for a, b in zip(params, clone):
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert restored.state[b][key].dtype == torch.float32
            torch.testing.assert_close(restored.state[b][key], opt.state[a][key], rtol=0, atol=0)
    set_grads(params, 1)
    for a, b in zip(params, clone):
        b.grad = a.grad.clone()
    opt.step()
    restored.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(opt.state[a]["master_param"], restored.state[b]["master_param"], rtol=0, atol=0)
