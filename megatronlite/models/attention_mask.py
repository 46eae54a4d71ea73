"""Causal attention restricted by a sliding window and/or document boundaries, on one rank.

One rule decides whether a query attends to a key, given both tokens' true positions in the
sequence: the key is not later (causal), it is fewer than `window` tokens back (HF
transformers' `sliding_window`: i - window < j <= i), and it lies in the query's document
(Megatron's --reset-attention-mask: packed documents do not see each other). `allowed` states
the rule once; the dense mask (`attention_mask`, also used by context parallelism) and the
FlexAttention mask_mod both evaluate it, so every path masks the same keys.

On CUDA the single-rank path runs compiled FlexAttention with a block mask, so no s x s mask
is ever materialised; elsewhere (and by choice) a dense boolean mask goes to SDPA, which is
exact and fine at CPU sizes. FlexAttention on CPU runs forward only (torch has no CPU backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IMPLS = ("auto", "dense", "flex")
_BLOCK_MASK_CACHE_SIZE = 8  # a few micro-batches in flight; every layer of one reuses its mask


def allowed(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
) -> torch.Tensor:
    """Elementwise (broadcasting): may the query at `q_pos` in document `q_doc` attend to the key at `k_pos`?"""
    ok = k_pos <= q_pos
    if window is not None:
        ok = ok & (k_pos > q_pos - window)
    if q_doc is not None:
        ok = ok & (q_doc == k_doc)
    return ok


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, documents: torch.Tensor | None
) -> torch.Tensor:
    """Boolean mask [B, sq, sk], True where a query attends to a key (B = batch with documents, else 1).

    q_pos [sq], k_pos [sk]: true positions in the whole sequence; documents [b, S]: the whole
    sequence's document ids, indexed by those positions.
    """
    q_doc = k_doc = None
    if documents is not None:
        q_doc, k_doc = documents[:, q_pos, None], documents[:, None, k_pos]
    mask = allowed(q_pos[:, None], k_pos[None, :], window, q_doc, k_doc)
    return mask if mask.dim() == 3 else mask.unsqueeze(0)


def check_mask_args(window: int | None, documents: torch.Tensor | None, batch: int, seq: int) -> None:
    """Refuse a window under one token (a query must see itself) and documents not shaped [batch, seq]."""
    if window is not None and window < 1:
        raise ValueError(f"the attention window must be at least 1 token, got {window}")
    if documents is not None and tuple(documents.shape) != (batch, seq):
        raise ValueError(f"documents must be [batch, sequence] = [{batch}, {seq}], got {list(documents.shape)}")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    documents: torch.Tensor | None,
    impl: str = "auto",
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention where a query sees only keys of its window and document.

    q: [b, hq, sq, d]; k, v: [b, hkv, s, d] with hq a multiple of hkv; window: tokens a query
    sees counting itself (None: all earlier ones); documents: [b, s] integer document ids,
    non-decreasing along s (None: one document). The keys are the positions 0..s-1; the queries
    too (sq = s) unless `q_positions` [sq] names theirs (CP's all-gather: this rank's chunks
    against the whole sequence). impl "auto" is FlexAttention on CUDA and a dense mask elsewhere;
    "dense" and "flex" force one. With neither window, documents nor query positions this is plain
    causal SDPA, whatever impl.
    """
    if impl not in IMPLS:
        raise ValueError(f"masked attention impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    gqa = q.shape[1] != k.shape[1]
    if window is None and documents is None and q_positions is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    b, s = q.shape[0], k.shape[2]
    check_mask_args(window, documents, b, s)
    if impl == "flex" or (impl == "auto" and q.is_cuda):
        return _flex_attention(q, k, v, window, documents, q_positions)
    keys = torch.arange(s, device=q.device)
    queries = keys if q_positions is None else q_positions
    mask = attention_mask(queries, keys, window, documents).unsqueeze(1)  # [B, 1, sq, s]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# --- FlexAttention ------------------------------------------------------------------------------

_block_masks: dict[tuple, tuple[tuple[torch.Tensor | None, ...], object]] = {}
_compiled: dict[str, Callable] = {}


def _flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    documents: torch.Tensor | None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexAttention with this (window, documents) block mask: compiled on CUDA, eager (forward only) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compile("flex_attention", flex_attention) if q.is_cuda else flex_attention
    block_mask = _block_mask(window, documents, k.shape[2], q.device, q_positions)
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _compile(name: str, fn: Callable) -> Callable:
    """`torch.compile(fn)`, made once per process (compiling is what makes FlexAttention fused)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _block_mask(
    window: int | None,
    documents: torch.Tensor | None,
    seq: int,
    device: torch.device,
    q_positions: torch.Tensor | None = None,
):
    """The block mask of `allowed`, cached so every layer of a forward (and its backward) builds it once.

    Keyed by the identity and version of the documents and query-position tensors (an in-place edit
    changes the version); the cache holds those tensors, so their ids cannot be reused while the entry lives.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    held = (documents, q_positions)
    key = (*((id(t), t._version if t is not None else 0) for t in held), window, seq, str(device))
    hit = _block_masks.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], held)):
        return hit[1]

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx if q_positions is None else q_positions[q_idx]
        if documents is None:
            return allowed(q_pos, kv_idx, window, None, None)
        return allowed(q_pos, kv_idx, window, documents[b, q_pos], documents[b, kv_idx])

    # compiled on CUDA: the eager builder materialises the dense mask it is meant to avoid
    build = _compile("create_block_mask", create_block_mask) if device.type == "cuda" else create_block_mask
    batch = None if documents is None else documents.shape[0]
    queries = seq if q_positions is None else q_positions.shape[0]
    block_mask = build(mask_mod, batch, None, queries, seq, device=device)
    if len(_block_masks) >= _BLOCK_MASK_CACHE_SIZE:
        del _block_masks[next(iter(_block_masks))]  # the oldest entry
    _block_masks[key] = (held, block_mask)
    return block_mask
