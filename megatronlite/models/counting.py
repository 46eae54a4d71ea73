"""Parameter count and training FLOPs per token, from the config alone.

FLOPs per token of one training step (forward + backward = 3x forward):

    6 * N_matmul  +  12 * L * s * (heads * head_size)

N_matmul counts the weights of every matrix multiply: QKV, attention output, MLP and the output
layer (V x h, counted even when tied, since the product is computed); embedding lookups and norms
are not multiplies. The second term is attention itself: per layer and token, QK^T and AV are each
2 * s * heads * head_size FLOPs forward (h when head_size = h / heads), over the full s x s score
matrix (causal masking is not discounted, as in Megatron-LM and PaLM, so MFU figures are comparable
with theirs). With a sliding window a query attends to at most `window` keys, so s becomes
min(s, window).
"""

from __future__ import annotations

from megatronlite.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    h, d, f = cfg.hidden_size, cfg.head_size, cfg.ffn_size
    qkv = h * (cfg.num_heads + 2 * cfg.kv_heads) * d
    proj = cfg.num_heads * d * h
    mlp = (3 if cfg.gated else 2) * h * f
    return qkv + proj + mlp


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the whole model, unpadded vocabulary, tied weights counted once."""
    h, d, f, v = cfg.hidden_size, cfg.head_size, cfg.ffn_size, cfg.vocab_size
    norm = 2 * h if cfg.norm == "layernorm" else h
    biases = (cfg.num_heads + 2 * cfg.kv_heads) * d if cfg.qkv_bias else 0
    if cfg.bias:
        biases += h + f * (2 if cfg.gated else 1) + h
    qk_norms = 2 * d if cfg.qk_norm else 0
    per_layer = layer_matmul_params(cfg) + 2 * norm + biases + qk_norms
    embedding = v * h + (cfg.max_seq_len * h if cfg.position == "learned" else 0)
    output = 0 if cfg.tied else v * h
    return embedding + cfg.num_layers * per_layer + norm + output


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (see the module docstring for the formula)."""
    n_matmul = cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size
    keys = min(seq_len, cfg.sliding_window or seq_len)  # the keys a query attends to, at most
    return 6 * n_matmul + 12 * cfg.num_layers * keys * cfg.num_heads * cfg.head_size
