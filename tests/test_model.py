import importlib.util

import pytest
import torch

from megatronlite import config
from megatronlite.config import ModelConfig
from megatronlite.kernels import apply_rotary
from megatronlite.models.counting import flops_per_token, parameter_count
from megatronlite.models.gpt import GPTModel, RunOptions
from megatronlite.models.init import init_parameters
from megatronlite.models.rope import rotary_tables

# published parameter counts of the shapes the presets copy
PUBLISHED = {
    "llama-1b": 1_235_814_400,  # Llama 3.2 1B
    "llama-8b": 8_030_261_248,  # Llama 3 8B
    "llama-70b": 70_553_706_496,  # Llama 3 70B
    "gpt2-small": 124_439_808,  # GPT-2 small
    "qwen3-0.6b": 596_049_920,  # Qwen3 0.6B
    "qwen3-1.7b": 1_720_574_976,  # Qwen3 1.7B
    "mistral-7b": 7_248_023_552,  # Mistral 7B v0.3
}


def padding_params(cfg: ModelConfig) -> int:
    extra_rows = cfg.padded_vocab_size() - cfg.vocab_size
    return extra_rows * cfg.hidden_size * (1 if cfg.tied else 2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    cfg = config.load(f"configs/models/{name}.yaml").model
    assert parameter_count(cfg) == PUBLISHED[name]
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) - padding_params(cfg) == PUBLISHED[name]


def test_hand_count_tiny_llama():
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, ffn_hidden_size=16, vocab_size=10
    )
    # per layer: qkv 8*(2+2)*4=128, proj 64, mlp 3*8*16=384, norms 16 -> 592; emb 80, out 80, final norm 8
    assert parameter_count(cfg) == 2 * 592 + 80 + 80 + 8
    cfg2 = ModelConfig(arch="gpt2", num_layers=1, hidden_size=8, num_heads=2, vocab_size=10, max_seq_len=4)
    # qkv 8*24+24, proj 64+8, fc1 8*32+32, fc2 32*8+8, 2 layernorms 32; emb 80 + pos 32; final ln 16; tied
    assert parameter_count(cfg2) == (216 + 72 + 288 + 264 + 32) + 80 + 32 + 16


def test_flops_formula():
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, ffn_hidden_size=16, vocab_size=10
    )
    assert flops_per_token(cfg, seq_len=5) == 6 * (2 * (128 + 64 + 384) + 80) + 12 * 2 * 3 * 8  # (5 + 1) / 2 keys


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("llama", 4), ("gpt2", None)])
def test_forward_shapes_and_causality(arch, kv):
    cfg = ModelConfig(
        arch=arch, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=kv, vocab_size=50, max_seq_len=16
    )
    model = GPTModel(cfg)
    init_parameters(model, cfg, seed=0)
    ids = torch.randint(0, 50, (3, 12))
    logits = model(ids)
    assert logits.shape == (3, 12, 50)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    assert torch.allclose(model(changed)[:, :8], logits[:, :8], atol=1e-6)  # no peeking ahead
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:])
    loss = model(ids, ids.roll(-1, 1))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids.roll(-1, 1).reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_init_is_seeded_and_deterministic():
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, vocab_size=20)
    a, b, c = GPTModel(cfg), GPTModel(cfg), GPTModel(cfg)
    init_parameters(a, cfg, seed=1)
    init_parameters(b, cfg, seed=1)
    init_parameters(c, cfg, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.sharding.init.endswith("normal"):
            assert not torch.equal(pa, pc), name
    assert not torch.equal(a.layers["0"].mlp.fc1.weight[:64], a.layers["0"].mlp.fc1.weight[64:])  # gate != up


def test_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    cos, sin = rotary_tables(ModelConfig(hidden_size=64, num_heads=4), torch.arange(10))
    hq, hk = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), hq)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hk)


@pytest.mark.parametrize(
    "options",
    [
        RunOptions(recompute="selective"),
        RunOptions(recompute="full"),
        RunOptions(recompute="full", recompute_layers=1),
        RunOptions(fused_cross_entropy=True),
        RunOptions(
            kernels={
                "rms_norm": "triton",
                "layer_norm": "torch",
                "rotary": "triton",
                "swiglu": "triton",
                "linear_cross_entropy": "triton",
                "adamw": "torch",
            },
            fused_cross_entropy=True,
        ),
    ],
    ids=["selective", "full", "full-1-layer", "chunked-ce", "triton-kernels"],
)
def test_run_options_keep_the_numbers(options):
    """Recompute, chunked loss and kernels change memory and speed, never the loss or the gradients."""
    if "triton" in options.kernels.values() and importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed: the triton kernel path is not checked")
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=50, max_seq_len=16
    )
    plain, other = GPTModel(cfg), GPTModel(cfg, options=options)
    init_parameters(plain, cfg, seed=0)
    init_parameters(other, cfg, seed=0)
    ids = torch.randint(0, 50, (2, 12))
    losses = [m(ids, ids.roll(-1, 1)) for m in (plain, other)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_split_gate_up_equals_the_fused_projection():
    """The torch path's one GEMM per SwiGLU half computes what the fused GEMM + fused SwiGLU do."""
    from megatronlite.kernels import reference

    cfg = ModelConfig(arch="llama", num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=50)
    model = GPTModel(cfg)
    init_parameters(model, cfg, seed=0)
    mlp = model.layers["0"].mlp
    assert mlp.split_halves  # the torch backend's default
    x = torch.randn(2, 7, 32, requires_grad=True)
    split = mlp(x)
    grads = torch.autograd.grad(split.square().sum(), (x, mlp.fc1.weight))
    fused = mlp.fc2(reference.swiglu(mlp.fc1(x)))
    fused_grads = torch.autograd.grad(fused.square().sum(), (x, mlp.fc1.weight))
    torch.testing.assert_close(split, fused, rtol=1e-6, atol=1e-6)
    for g, f in zip(grads, fused_grads):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6)


def test_the_readme_lists_every_preset_with_its_parameter_count():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    listed = dict(re.findall(r"^\| `([\w.-]+\.yaml)`[^|]*\| ([\d.]+)B \|$", (repo / "README.md").read_text(), re.M))
    presets = sorted(p.name for p in (repo / "configs" / "models").glob("*.yaml"))
    assert sorted(listed) == presets
    for name, billions in listed.items():
        count = parameter_count(config.load(repo / "configs" / "models" / name).model)
        assert f"{count / 1e9:.2f}" == billions, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_under_bf16_autocast_the_residual_stream_and_norms_are_bf16(arch):
    """What SP's collectives and pipeline sends move: the layers' outputs (the residual stream) and the norms'
    outputs in the compute dtype, as Megatron's; the loss in fp32."""
    cfg = ModelConfig(
        arch=arch, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, vocab_size=50
    )
    model = GPTModel(cfg)
    init_parameters(model, cfg, seed=0)
    seen = {}
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.count(".") == 1 or type(module).__name__ == "Norm":
            module.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.dtype))
    tokens = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model.hidden(tokens[:, :-1]), tokens[:, 1:])
    assert seen and set(seen.values()) == {torch.bfloat16}, seen
    assert loss.dtype == torch.float32
    assert len([n for n in seen if n.startswith("layers.") and n.count(".") == 1]) == 2
