"""Parameter count and training FLOPs per token, from the config alone.

FLOPs per token of one training step (forward + backward = 3x forward):

    6 * N_matmul  +  12 * L * keys * (heads * head_size)

N_matmul counts the weights of every matrix multiply: QKV, attention output, MLP and the output
layer (V x h, counted even when tied, since the product is computed); embedding lookups and norms
are not multiplies. The second term is attention itself: per layer and token, QK^T and AV are each
2 * keys * heads * head_size FLOPs forward (h when head_size = h / heads), where `keys` is the mean
number of keys a query sees: the causal mask's non-zero entries over its s rows, (s + 1) / 2 (a sliding
window of w keys: (w (w + 1) / 2 + (s - w) w) / s). Megatron-LM counts the same since March 2025 (its
`num_floating_point_operations`: "causal mask (only half of the mask is non-zero)", s / 2, the diagonal
aside); PaLM's appendix and Megatron before then count the whole s x s matrix, so their MFU figures are
higher by that term. Packed documents (`data.document_mask`) are counted as one sequence: their attention
is less (Megatron's packed path counts sum(L_i^2) / 2), so MFU reads high there by up to that difference.
In a mixture-of-experts layer the MLP term counts the *active* weights: the top-k experts a token goes to,
the shared expert and the router (so MFU is of the compute a token really gets).
"""

from __future__ import annotations

from megatronlite.config import ModelConfig


def mlp_params(cfg: ModelConfig, f: int, bias: bool) -> int:
    """Weights (and biases) of one dense MLP of width `f`."""
    h = cfg.hidden_size
    return (3 if cfg.gated else 2) * h * f + (f * (2 if cfg.gated else 1) + h if bias else 0)


def moe_params(cfg: ModelConfig, experts: int) -> int:
    """An MoE layer's weights when `experts` of its experts count: the router, those experts, the shared one."""
    moe, h = cfg.moe, cfg.hidden_size
    shared = mlp_params(cfg, moe.shared_expert_ffn_hidden_size, cfg.bias) if moe.shared_expert_ffn_hidden_size else 0
    gate = h if moe.shared_expert_gate else 0
    return moe.num_experts * h + experts * mlp_params(cfg, cfg.expert_ffn_size, False) + shared + gate


def layer_matmul_params(cfg: ModelConfig, experts: bool = False) -> int:
    """Weights a token is multiplied by in one layer (an MoE layer: its active experts)."""
    h, d = cfg.hidden_size, cfg.head_size
    qkv = h * (cfg.num_heads + 2 * cfg.kv_heads) * d
    proj = cfg.num_heads * d * h
    mlp = moe_params(cfg, cfg.moe.top_k) if experts else mlp_params(cfg, cfg.ffn_size, False)
    return qkv + proj + mlp


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the whole model (every expert), unpadded vocabulary, tied weights counted once."""
    h, d, v = cfg.hidden_size, cfg.head_size, cfg.vocab_size
    norm = 2 * h if cfg.norm == "layernorm" else h
    attention = h * (cfg.num_heads + 2 * cfg.kv_heads) * d + cfg.num_heads * d * h
    attention += (cfg.num_heads + 2 * cfg.kv_heads) * d if cfg.qkv_bias else 0
    attention += h if cfg.bias else 0
    qk_norms = 2 * d if cfg.qk_norm else 0
    layers = 0
    for experts in cfg.moe.layers(cfg.num_layers):
        mlp = moe_params(cfg, cfg.moe.num_experts) if experts else mlp_params(cfg, cfg.ffn_size, cfg.bias)
        layers += attention + mlp + 2 * norm + qk_norms
    embedding = v * h + (cfg.max_seq_len * h if cfg.position == "learned" else 0)
    output = 0 if cfg.tied else v * h
    return embedding + layers + norm + output


def attended_keys(seq_len: int, window: int | None) -> float:
    """The mean number of keys a query sees under the causal mask (itself and those before it, at most `window`):
    the mask's non-zero entries over its rows, (s + 1) / 2 without a window."""
    w = min(seq_len, window or seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring for the formula)."""
    n_matmul = sum(layer_matmul_params(cfg, experts) for experts in cfg.moe.layers(cfg.num_layers))
    n_matmul += cfg.vocab_size * cfg.hidden_size
    keys = attended_keys(seq_len, cfg.sliding_window)
    return 6 * n_matmul + 12 * cfg.num_layers * keys * cfg.num_heads * cfg.head_size
