"""Context parallelism: each sequence is split over the CP ranks, and attention is exact over the whole of it.

A sequence of length S is cut into 2C equal chunks and CP rank i holds chunks i and 2C-1-i,
concatenated in that order (Megatron's load balancing). Under a causal mask a late chunk
attends to far more keys than an early one; pairing chunk i with its mirror gives every rank
the same amount of attention work. Everything outside attention is per-token, so only
attention (and the positions fed to RoPE / learned embeddings) needs to know about CP.

Two implementations of `context_attention`, both exact in forward and backward:

* "ring": the K/V blocks travel around the ring of CP ranks, one step per rank, the next block
  in flight while the current one is used; partial results merge with an online softmax. Forward
  holds two K/V blocks at a time; backward also holds the travelling dK/dV buffers (fp32, so the
  backward ring moves twice forward's bytes under bf16): memory stays O(S / C).
* "allgather": gather the whole K/V, attend with a causal mask by true position. Simpler and
  often as fast for short sequences or GQA's small K/V; memory O(S) for K/V.

Both take an optional sliding window and document ids (`models.attention_mask`): a mask by true
position, so the load-balanced layout changes nothing. The ring builds each block pair's mask from
its chunks' positions and skips pairs with nothing to attend (far outside the window, or in other
documents); rows with nothing to attend inside a block contribute nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatronlite.models.attention_mask import attention_mask, check_mask_args, masked_attention
from megatronlite.parallel.mappings import gather_from_sp

Group = dist.ProcessGroup | None
IMPLS = ("ring", "allgather")


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two sequence chunks (of 2*cp) CP rank `cp_rank` holds: an early one and its mirror."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank must be in [0, {cp}), got {cp_rank}")
    return cp_rank, 2 * cp - 1 - cp_rank


def split_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp: int) -> torch.Tensor:
    """This rank's two chunks of the full sequence `x`, concatenated along `dim` (`x` itself at cp = 1)."""
    if cp == 1:
        return x
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by 2 * context parallel size = {2 * cp}")
    chunks = x.chunk(2 * cp, dim=dim)
    first, second = chunk_ids(cp_rank, cp)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def unsplit_sequence(locals_: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The full sequence from every rank's `split_sequence` part, given in CP rank order."""
    if len(locals_) == 1:
        return locals_[0]
    halves = [x.chunk(2, dim=dim) for x in locals_]
    # chunks 0..C-1 are the ranks' first halves in rank order; C..2C-1 their second halves reversed
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def local_positions(seq_local: int, cp_rank: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The true positions (0..S-1) of this rank's `seq_local` tokens, in local order: what RoPE must see."""
    if cp == 1:
        return torch.arange(seq_local, device=device)
    if seq_local % 2:
        raise ValueError(f"the local sequence length {seq_local} must be even under context parallelism")
    c = seq_local // 2
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp_rank, cp)])


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    impl: str = "ring",
    window: int | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact causal attention over the global sequence, each CP rank holding its load-balanced part.

    q: [b, hq, s_local, d]; k, v: [b, hkv, s_local, d] with hq a multiple of hkv (each KV head
    serves hq/hkv consecutive q heads). window: a query sees keys fewer than `window` true
    positions back (None: all earlier ones); documents: the WHOLE sequence's document ids
    [b, cp * s_local] in true order, the same on every CP rank (None: one document). Returns
    [b, hq, s_local, d] in q's dtype. With no group (or one rank) this is `masked_attention`.
    """
    if impl not in IMPLS:
        raise ValueError(f"context attention impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if group is None or dist.get_world_size(group) == 1:
        return masked_attention(q, k, v, window, documents)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[2] % 2:
        raise ValueError(f"the local sequence length {q.shape[2]} must be even under context parallelism")
    check_mask_args(window, documents, q.shape[0], dist.get_world_size(group) * q.shape[2])
    if impl == "ring":
        return _RingAttention.apply(q, k, v, group, window, documents)
    return _allgather_attention(q, k, v, group, window, documents)


def _allgather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, window: int | None, documents: torch.Tensor | None
) -> torch.Tensor:
    """Gather K/V (its gradient is reduce-scattered back to the owners), mask by true position."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    s_local = q.shape[2]
    kv = gather_from_sp(torch.stack((k, v)), dim=3, group=group)  # [2, b, hkv, cp * s_local, d], rank order
    k_full, v_full = unsplit_sequence(list(kv.chunk(cp, dim=3)), dim=3).unbind(0)
    q_pos = _query_positions(s_local, rank, cp, q.device)
    return masked_attention(q, k_full, v_full, window, documents, q_positions=q_pos)


# one tensor per (length, rank, CP, device), so FlexAttention's block-mask cache recognises it (on CUDA the
# all-gather path masks with a block mask, never a dense [S / C, S] one)
_query_positions = functools.lru_cache(maxsize=16)(local_positions)


# --- ring attention -------------------------------------------------------------------------------


def _ring_shift(x: torch.Tensor, group: Group) -> tuple[torch.Tensor, list]:
    """Start sending `x` to the next CP rank and receiving the previous one's; (receive buffer, requests)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    recv = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, dist.get_global_rank(group, (rank + 1) % cp), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (rank - 1) % cp), group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for req in requests:
        req.wait()


class _Pair(NamedTuple):
    """A pair of local halves whose chunks attend: q half, K/V half (0 first, 1 second), their chunk ids."""

    qi: int
    ki: int
    q_chunk: int
    kv_chunk: int
    masked: bool  # some (query, key) of the pair is masked out: the causal diagonal, a window or document edge


class _Masking(NamedTuple):
    """What restricts attention beyond causality: window, whole-sequence documents, and each chunk's document range."""

    window: int | None
    documents: torch.Tensor | None
    doc_ranges: list | None  # [b][2 * cp] (lowest, highest) document id: read once per call, for skipping pairs

    @classmethod
    def of(cls, window: int | None, documents: torch.Tensor | None, cp: int) -> _Masking:
        """Read the chunks' document ranges to the host once (one sync), so skipping pairs costs no more."""
        if documents is None:
            return cls(window, None, None)
        chunks = documents.reshape(documents.shape[0], 2 * cp, -1)
        return cls(window, documents, torch.stack((chunks.amin(-1), chunks.amax(-1)), dim=-1).tolist())

    def pairs(self, cp_rank: int, kv_rank: int, cp: int, c: int) -> list[_Pair]:
        """The pairs of local halves with anything to attend, and whether each needs a mask.

        A q chunk sees all of an earlier chunk, the causal triangle of itself, nothing of a later
        one; nothing of a chunk whose every key is `window` or more positions back, nor of one
        sharing no document with it in any batch row. Chunk a holds positions [a * c, (a + 1) * c).
        """
        window, ranges = self.window, self.doc_ranges
        pairs = []
        for qi, a in enumerate(chunk_ids(cp_rank, cp)):
            for ki, b in enumerate(chunk_ids(kv_rank, cp)):
                too_far = window is not None and (b + 1) * c - 1 <= a * c - window
                apart = ranges is not None and all(r[b][1] < r[a][0] or r[a][1] < r[b][0] for r in ranges)
                if b > a or too_far or apart:
                    continue
                window_cuts = window is not None and b * c <= (a + 1) * c - 1 - window
                doc_cuts = ranges is not None and not all(r[a][0] == r[a][1] == r[b][0] == r[b][1] for r in ranges)
                pairs.append(_Pair(qi, ki, a, b, a == b or window_cuts or doc_cuts))
        return pairs

    def mask(self, pair: _Pair, c: int, device: torch.device) -> torch.Tensor | None:
        """The pair's mask [B, 1, 1, c, c] (True: attend) from its chunks' true positions; None if it masks nothing."""
        if not pair.masked:
            return None
        q_pos, k_pos = (torch.arange(i * c, (i + 1) * c, device=device) for i in (pair.q_chunk, pair.kv_chunk))
        return attention_mask(q_pos, k_pos, self.window, self.documents)[:, None, None]


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Scaled scores of a q chunk [b, hkv, g, c, d] against a K chunk [b, hkv, c, d]: [b, hkv, g, c, c].

    The g query heads of a KV head share it by broadcasting, so K/V are never repeated.
    """
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """`lse` with -inf (a row with nothing to attend yet) as 0: exp(-inf - 0) weighs it 0 where -inf - -inf is NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _grouped(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, hq, s, d] -> [b, hkv, hq/hkv, s, d] in `dtype`: query heads grouped under their KV head."""
    b, hq, s, d = x.shape
    return x.to(dtype).reshape(b, hkv, hq // hkv, s, d)


class _RingAttention(torch.autograd.Function):
    """Ring attention over the CP group; computes in fp32 (fp64 if given) whatever the input dtype."""

    @staticmethod
    def forward(ctx, q, k, v, group, window, documents):
        masking = _Masking.of(window, documents, dist.get_world_size(group))
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, group, masking)
        out = out.to(q.dtype)
        # the output, not an fp32 copy: it is kept alive anyway, and rowsum(dO * O) needs no more
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.masking = group, masking
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.masking)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, masking: _Masking
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, hq, s, d], log-sum-exp [b, hkv, g, s]) in the compute dtype.

    At step j this rank holds the K/V block that started on rank (rank - j) mod C. Each pair of
    chunks gives a normalised partial output and its log-sum-exp; the running output is
    rescaled to the merged log-sum-exp, which is exactly softmax over all keys seen so far. A row
    with nothing to attend in a block has log-sum-exp -inf and adds nothing.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, hq, s, d = q.shape
    hkv, c, scale = k.shape[1], s // 2, d**-0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = _grouped(q, hkv, dtype)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    kv = torch.stack((k, v))  # travels in the input dtype: half the bytes under bf16
    for step in range(cp):
        if step + 1 < cp:
            next_kv, requests = _ring_shift(kv, group)
        k_blk, v_blk = kv.to(dtype).unbind(0)
        for pair in masking.pairs(rank, (rank - step) % cp, cp, c):
            qs, ks = slice(pair.qi * c, (pair.qi + 1) * c), slice(pair.ki * c, (pair.ki + 1) * c)
            scores = _scores(q[..., qs, :], k_blk[..., ks, :], masking.mask(pair, c, q.device), scale)
            blk_lse = scores.logsumexp(dim=-1)
            blk_out = torch.matmul(torch.exp(scores - _finite(blk_lse).unsqueeze(-1)), v_blk[..., ks, :].unsqueeze(2))
            new_lse = torch.logaddexp(lse[..., qs], blk_lse)
            old_weight = torch.exp(lse[..., qs] - _finite(new_lse)).unsqueeze(-1)
            blk_weight = torch.exp(blk_lse - _finite(new_lse)).unsqueeze(-1)
            out[..., qs, :] = out[..., qs, :] * old_weight + blk_out * blk_weight
            lse[..., qs] = new_lse
        if step + 1 < cp:
            _wait(requests)
            kv = next_kv
    return out.reshape(b, hq, s, d), lse


def _ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: Group,
    masking: _Masking,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the compute dtype.

    The K/V blocks go round the ring again in the same order. Probabilities are recomputed from
    the final log-sum-exp; dQ accumulates here, while each block's dK/dV accumulate in a buffer
    that follows one step behind its block, so after C steps every buffer is back at its owner
    holding the sum over all ranks. Sending a buffer overlaps with the next step's compute. The
    final log-sum-exp is finite (every query sees itself), so masked scores give probability 0.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, hq, s, d = q.shape
    hkv, c, scale = k.shape[1], s // 2, d**-0.5
    dtype = lse.dtype
    q, dout = _grouped(q, hkv, dtype), _grouped(dout, hkv, dtype)
    delta = (dout * _grouped(out, hkv, dtype)).sum(dim=-1)  # rowsum(dO * O): softmax's backward term
    dq = torch.zeros_like(q)
    kv = torch.stack((k, v))
    dkv_in, dkv_requests = None, []
    for step in range(cp):
        if step + 1 < cp:
            next_kv, kv_requests = _ring_shift(kv, group)
        k_blk, v_blk = kv.to(dtype).unbind(0)
        dkv = torch.zeros((2, b, hkv, s, d), dtype=dtype, device=q.device)
        dk_blk, dv_blk = dkv.unbind(0)
        for pair in masking.pairs(rank, (rank - step) % cp, cp, c):
            qs, ks = slice(pair.qi * c, (pair.qi + 1) * c), slice(pair.ki * c, (pair.ki + 1) * c)
            scores = _scores(q[..., qs, :], k_blk[..., ks, :], masking.mask(pair, c, q.device), scale)
            probs = torch.exp(scores - lse[..., qs].unsqueeze(-1))
            do = dout[..., qs, :]
            dv_blk[..., ks, :] += torch.matmul(probs.transpose(-1, -2), do).sum(dim=2)
            dprobs = torch.matmul(do, v_blk[..., ks, :].unsqueeze(2).transpose(-1, -2))
            dscores = probs * (dprobs - delta[..., qs].unsqueeze(-1)) * scale
            dq[..., qs, :] += torch.matmul(dscores, k_blk[..., ks, :].unsqueeze(2))
            dk_blk[..., ks, :] += torch.matmul(dscores.transpose(-1, -2), q[..., qs, :]).sum(dim=2)
        if dkv_in is not None:  # the previous ranks' sum for this block, sent at their previous step
            _wait(dkv_requests)
            dkv += dkv_in
        dkv_in, dkv_requests = _ring_shift(dkv, group)
        if step + 1 < cp:
            _wait(kv_requests)
            kv = next_kv
    _wait(dkv_requests)  # the last shift brings each rank its own block's gradient
    dk, dv = dkv_in.unbind(0)
    return dq.reshape(b, hq, s, d), dk, dv
