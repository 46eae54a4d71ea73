"""The GPU path, natively on CUDA (`pytest -m gpu`; `make gpu-check` runs them on a lent GPU machine).

Kernels: the interpreter-mode cases of test_kernels_*.py, run again natively (their DEVICE is cuda
here), then the norms, SwiGLU, RoPE and the fused cross-entropy at the widths of the 125M and 1B
presets, where Triton launches several blocks per row or column and the backward loops over rows.
Training: a bf16 run of the demo model on one GPU (the loss falls, resume is bit-exact), CUDA's
RNG restored from a checkpoint, `train.device: auto` on CUDA (NCCL with two GPUs), the compiled
blocks. The MoE layer's grouped GEMM. apex and Transformer Engine, where they import.
"""

import os

import pytest
import test_kernels_adamw as adamw_cases
import test_kernels_cross_entropy as ce_cases
import test_kernels_ops as op_cases
import test_moe as moe_cases
import torch
from helpers import launch, resume_from, tiny_overrides, train

from megatronlite import config
from megatronlite.kernels import apply_rotary, external, fused_adamw, layer_norm, rms_norm, swiglu
from megatronlite.kernels.testing import TOLERANCES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tests need CUDA (`make gpu-check` on a GPU machine)"),
]
DTYPES = [torch.float32, torch.bfloat16]
WIDTHS = [768, 2048]  # the 125M and 1B presets' hidden sizes; 768 is no power of two, so the masks matter


@pytest.fixture
def ieee_matmul():
    """fp32 matmuls in full precision (a run may have switched TF32 on): the fp32 tolerances assume it.
    Restored by hand: the flag is a property of torch.backends.cuda.matmul, which monkeypatch cannot delete."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# --- Triton kernels against the torch reference ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreter_cases_natively(dtype):
    for weight_fp32 in (False, True):
        op_cases.test_rms_norm(dtype, weight_fp32)
    for with_bias in (True, False):
        op_cases.test_layer_norm(dtype, with_bias)
    op_cases.test_rotary_on_strided_view(dtype)
    op_cases.test_swiglu(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", WIDTHS)
def test_norms_at_preset_widths(dtype, hidden):
    # few rows: the bf16 reference rounds each row's weight-gradient term, so its sum drifts with the row count
    torch.manual_seed(4)
    x = op_cases.randn(2, 4, hidden, dtype=dtype)
    w = op_cases.randn(hidden, dtype=dtype, scale=0.5, shift=1.0)
    op_cases.check(rms_norm, (x, w, 1e-5), dtype)
    op_cases.check(layer_norm, (x, w, op_cases.randn(hidden, dtype=dtype), 1e-5), dtype)


def test_norm_backward_with_several_rows_per_program():
    """More rows than the backward launches programs (4 per SM), so each program loops over rows; fp32, where
    the reference's weight gradient is exact enough to compare over hundreds of rows."""
    rows = 4 * torch.cuda.get_device_properties(0).multi_processor_count + 37
    torch.manual_seed(5)
    x = op_cases.randn(rows, 2048)
    w = op_cases.randn(2048, scale=0.5, shift=1.0)
    op_cases.check(rms_norm, (x, w, 1e-5), torch.float32)
    op_cases.check(layer_norm, (x, w, op_cases.randn(2048), 1e-5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_and_rotary_at_1b_shapes(dtype):
    torch.manual_seed(6)
    op_cases.check(swiglu, (op_cases.randn(16, 2 * 8192, dtype=dtype, scale=2.0),), dtype)  # 8 column blocks
    x = op_cases.randn(2, 256, 32, 64, dtype=dtype).transpose(1, 2)  # [b, heads, s, d] as the model makes it
    cos, sin = (torch.randn(256, 64, device="cuda") for _ in range(2))
    op_cases.check(apply_rotary, (x, cos, sin), dtype)


@pytest.mark.usefixtures("ieee_matmul")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_cases_natively(dtype):
    for chunk_size in (5, None):
        ce_cases.test_matches_unfused_with_padded_vocab("triton", chunk_size, dtype)
    ce_cases.test_autocast_bf16_matches_unfused("triton")


@pytest.mark.usefixtures("ieee_matmul")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [128, None], ids=["uneven-chunks", "default-chunks"])
def test_cross_entropy_at_1b_vocab(dtype, chunk_size):
    """The 1B preset's 128,256 output rows (the last 56 padding), several 4096-column blocks per row."""
    vocab_size, g = 128_200, torch.Generator().manual_seed(7)
    hidden = torch.randn(300, 256, generator=g).cuda().to(dtype).requires_grad_()
    weight = (torch.randn(128_256, 256, generator=g) * 0.05).cuda().to(dtype).requires_grad_()
    target = torch.randint(0, vocab_size, (300,), generator=g).cuda()
    target[0] = vocab_size - 1
    expected = ce_cases.reference(hidden, weight, target, vocab_size)
    got = ce_cases.fused(hidden, weight, target, vocab_size, "triton", chunk_size=chunk_size)
    for g_, e in zip(got, expected):
        assert g_.dtype == e.dtype and g_.shape == e.shape
        torch.testing.assert_close(g_.float(), e.float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_adamw_natively(impl):
    """fp32 against torch.optim.AdamW, and bf16 parameters rewritten from the fp32 masters every step."""
    adamw_cases.test_fp32_matches_torch_adamw(impl)
    adamw_cases.test_bf16_params_step_fp32_masters(impl)


@pytest.mark.parametrize("ffn", [16, 12], ids=["aligned", "unaligned"])
def test_moe_grouped_gemm_natively(monkeypatch, ffn):
    """torch._grouped_mm against cuBLAS GEMMs per expert; a width it refuses falls back to the latter."""
    for grouped, looped in moe_cases.grouped_and_looped(monkeypatch, ffn, "cuda"):
        torch.testing.assert_close(grouped.float(), looped.float(), **TOLERANCES[torch.bfloat16])


# --- training on one GPU ---------------------------------------------------------------------------


def test_bf16_run_loss_falls_and_resume_is_exact(tmp_path, corpus):
    sets = {"train.precision": "bf16", "train.device": "cuda", "train.steps": 30, "checkpoint.interval": 10}
    full = tmp_path / "full"
    reference = train(full, tiny_overrides(corpus, full, **sets))
    first, last = reference[0]["loss"], sum(m["loss"] for m in reference[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)
    resumed = tmp_path / "resumed"
    resume_from(full, "step_0000020", resumed)
    after = train(resumed, tiny_overrides(corpus, resumed, **sets))
    assert [m["step"] for m in after] == list(range(21, 31))
    assert [m["loss"] for m in after] == [m["loss"] for m in reference[20:]]
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in reference[20:]]


def test_cuda_rng_is_restored_on_resume(tmp_path, corpus):
    from megatronlite.parallel.mesh import build_mesh
    from megatronlite.train import checkpointing
    from megatronlite.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = config.load("configs/demo.yaml", tiny_overrides(corpus, run))
    device = torch.device("cuda", 0)
    trainer = Trainer(cfg, run, build_mesh(cfg, 1, 0), device)
    torch.cuda.manual_seed(123)
    torch.rand(1000, device=device)  # an advanced state, not a fresh seed's
    saved = torch.cuda.get_rng_state(device)
    saver = checkpointing.Checkpointer(trainer)
    trainer.step = 4
    saver.save()
    saver.wait()
    torch.cuda.manual_seed(999)
    assert not torch.equal(torch.cuda.get_rng_state(device), saved)
    checkpointing.load(trainer, run / "checkpoints" / "step_0000004")
    assert torch.equal(torch.cuda.get_rng_state(device), saved)


def test_device_auto_trains_on_cuda_in_bf16(tmp_path, corpus, capsys):
    """train.device: auto and train.precision: auto (the defaults) are CUDA and bf16 on a GPU, and config.yaml
    records the precision that ran."""
    run = tmp_path / "run"
    train(run, tiny_overrides(corpus, run, **{"train.device": "auto", "train.precision": "auto", "train.steps": 2}))
    assert "device cuda:0, precision bf16" in capsys.readouterr().out
    assert config.load(run / "config.yaml", []).train.precision == "bf16"


def test_initialization_is_drawn_on_the_gpu():
    """Each full tensor is drawn by a CUDA generator where the parameter lives (then sliced per layout, as on
    CPU): the same on every init, not the CPU draw copied over."""
    from megatronlite.models.gpt import GPTModel
    from megatronlite.models.init import full_tensor, init_parameters

    cfg = config.load("configs/demo.yaml", []).model
    models = [GPTModel(cfg).cuda() for _ in range(2)]
    for model in models:
        init_parameters(model, cfg, seed=3)
    name, qkv = "layers.0.attention.qkv.weight", models[0].layers["0"].attention.qkv.weight
    assert torch.equal(qkv, full_tensor(name, qkv.sharding, cfg, 3, qkv.device))
    assert not torch.equal(qkv.cpu(), full_tensor(name, qkv.sharding, cfg, 3, "cpu"))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason=f"NCCL needs one GPU per rank; this machine has {torch.cuda.device_count()}"
)
def test_device_auto_two_workers_use_nccl(tmp_path, corpus):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.device": "auto", "train.steps": 2})
    done = launch("configs/demo.yaml", run, 2, sets, env={**os.environ, "NCCL_DEBUG": "INFO"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "NCCL INFO" in done.stdout + done.stderr
    assert "device cuda:0" in done.stdout


def test_compiled_blocks_keep_the_losses(tmp_path, corpus):
    from torch._dynamo.utils import counters

    sets = {"train.device": "cuda", "train.steps": 4}
    base = train(tmp_path / "eager", tiny_overrides(corpus, tmp_path / "eager", **sets))
    counters.clear()
    compiled = train(
        tmp_path / "compiled", tiny_overrides(corpus, tmp_path / "compiled", **sets) + ["train.compile=true"]
    )
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    # the demo trains in bf16 on a GPU: eager rounds each op's output to bf16, inductor keeps a fused kernel's
    # intermediates in fp32, so the losses drift apart by bf16 roundings (a broken graph is off by far more)
    for got, want in zip(compiled, base, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)


# --- apex and Transformer Engine ------------------------------------------------------------------


def _as_triton(fn, backend):
    """`fn` with impl="triton" sent to `backend`: op_cases.check compares impl="triton" against impl="torch"."""

    def call(*args, impl):
        return fn(*args, impl=backend if impl == "triton" else impl)

    return call


@pytest.mark.parametrize("backend", ["apex", "te"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_external_norms(backend, dtype):
    if not external.available(backend):
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(8)
    x = op_cases.randn(2, 4, 2048, dtype=dtype)
    w = op_cases.randn(2048, dtype=dtype, scale=0.5, shift=1.0)
    op_cases.check(_as_triton(rms_norm, backend), (x, w, 1e-5), dtype)
    op_cases.check(_as_triton(layer_norm, backend), (x, w, op_cases.randn(2048, dtype=dtype), 1e-5), dtype)


def test_apex_adamw_matches_torch():
    if not external.available("apex"):
        pytest.skip("apex is not installed")
    ours, theirs = adamw_cases.make_params(torch.float32), adamw_cases.make_params(torch.float32)
    opt = fused_adamw(adamw_cases.groups(ours), lr=1.0, impl="apex", **adamw_cases.HYPER)
    ref = torch.optim.AdamW(adamw_cases.groups(theirs), lr=1.0, foreach=False, **adamw_cases.HYPER)
    for step in range(2):  # later steps leave a parameter without a gradient: apex counts steps per group
        adamw_cases.set_grads(ours, step)
        adamw_cases.set_grads(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
