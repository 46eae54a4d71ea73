"""MFU against the README's definition: FLOPs per token recounted from the model's own weights, over a peak."""

import pytest
import torch

from megatronlite.config import ModelConfig
from megatronlite.models.counting import flops_per_token
from megatronlite.models.gpt import GPTModel
from megatronlite.train.metrics import mfu, peak_flops

SEQ = 48
CONFIGS = {
    "llama-gqa": ModelConfig(
        arch="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96
    ),
    "gpt2-tied": ModelConfig(
        arch="gpt2", num_layers=2, hidden_size=48, num_heads=3, ffn_hidden_size=80, max_seq_len=SEQ
    ),
    # heads x head_dim (72) is not the hidden size (64); biases and q/k norms are no multiplies
    "qwen3-head-dim": ModelConfig(
        arch="qwen3", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=18, bias=True
    ),
    "mistral-window": ModelConfig(arch="mistral", num_layers=2, hidden_size=64, num_heads=4, sliding_window=16),
}


def readme_flops(model: GPTModel, seq_len: int) -> float:
    """6 x (matmul parameters, output layer included) + 12 x layers x keys x heads x head_dim, from the weights'
    shapes and the attention mask.

    The matmuls are the layers' 2-D weights (biases and norms are not multiplies) and the output layer over the
    real vocabulary, whether or not it is tied to the embedding (the product is computed either way). The
    attention width is what the output projection reads; keys: the mean over queries of the keys the causal
    (and windowed) mask lets each see."""
    params = dict(model.named_parameters())
    layer_matmuls = sum(p.numel() for name, p in params.items() if name.startswith("layers.") and p.ndim == 2)
    vocab, hidden = model.cfg.vocab_size, params["embedding.word.weight"].shape[1]
    width = params["layers.0.attention.proj.weight"].shape[1]
    query, key = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None]
    seen = (key <= query) & (query - key < (model.cfg.sliding_window or seq_len))
    keys = seen.sum().item() / seq_len
    return 6 * (layer_matmuls + vocab * hidden) + 12 * len(model.layers) * keys * width


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_flops_per_token_is_the_readme_formula(cfg):
    """counting.py works from the config; the model's real weights must give the same count."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert flops_per_token(cfg, SEQ) == pytest.approx(readme_flops(model, SEQ), rel=1e-12)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA GB200", 2500e12),
        ("NVIDIA B200", 2250e12),
    ],
)
def test_mfu_is_model_flops_over_the_peak(monkeypatch, name, peak):
    """The table's peak for the device (its first matching entry: a PCIe H100 is not an SXM one), and
    MFU = tokens/s x FLOPs per token / peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    flops = flops_per_token(CONFIGS["llama-gqa"], SEQ)
    assert mfu(250_000.0, flops, peak) == pytest.approx(250_000.0 * flops / peak, rel=1e-12)


def test_an_unknown_device_has_no_mfu(monkeypatch):
    """A guessed peak would make the number meaningless: None, with a warning, and so no MFU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    with pytest.warns(UserWarning, match="no peak FLOP/s known for GPU 'Some Future GPU'"):
        peak = peak_flops(torch.device("cuda", 0))
    assert peak is None and mfu(12_345.0, 1_000_000, peak) is None
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "name, capability, precision, tf32, peak",
    [
        ("NVIDIA H100 80GB HBM3", (9, 0), "fp16", True, 989e12),
        ("NVIDIA H100 80GB HBM3", (9, 0), "fp32", True, 989e12 / 2),  # TF32: half the bf16 rate
        ("NVIDIA A100-SXM4-80GB", (8, 0), "fp32", True, 156e12),
        ("NVIDIA H100 80GB HBM3", (9, 0), "fp32", False, None),  # IEEE fp32: no tensor-core peak in the table
        ("Tesla V100-SXM2-32GB", (7, 0), "fp32", True, None),  # no TF32 on Volta
    ],
)
def test_the_peak_is_the_precision_the_matmuls_run_in(monkeypatch, name, capability, precision, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if peak is None:
        with pytest.warns(UserWarning, match="no fp32 peak without TF32"):
            assert peak_flops(torch.device("cuda", 0), precision, tf32) is None
    else:
        assert peak_flops(torch.device("cuda", 0), precision, tf32) == peak
