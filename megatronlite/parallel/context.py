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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, impl: str = "ring"
) -> torch.Tensor:
    """Exact causal attention over the global sequence, each CP rank holding its load-balanced part.

    q: [b, hq, s_local, d]; k, v: [b, hkv, s_local, d] with hq a multiple of hkv (each KV head
    serves hq/hkv consecutive q heads). Returns [b, hq, s_local, d] in q's dtype. With no group
    (or one rank) this is plain causal `scaled_dot_product_attention`.
    """
    if impl not in IMPLS:
        raise ValueError(f"context attention impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    gqa = q.shape[1] != k.shape[1]
    if group is None or dist.get_world_size(group) == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[2] % 2:
        raise ValueError(f"the local sequence length {q.shape[2]} must be even under context parallelism")
    if impl == "ring":
        return _RingAttention.apply(q, k, v, group)
    return _allgather_attention(q, k, v, group, gqa)


def _allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, gqa: bool) -> torch.Tensor:
    """Gather K/V (its gradient is reduce-scattered back to the owners), mask by true position."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    s_local = q.shape[2]
    kv = gather_from_sp(torch.stack((k, v)), dim=3, group=group)  # [2, b, hkv, cp * s_local, d], rank order
    k_full, v_full = unsplit_sequence(list(kv.chunk(cp, dim=3)), dim=3).unbind(0)
    q_pos = local_positions(s_local, rank, cp, q.device)
    mask = q_pos[:, None] >= torch.arange(cp * s_local, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, enable_gqa=gqa)


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


def _block_pairs(cp_rank: int, kv_rank: int, cp: int) -> list[tuple[int, int, bool]]:
    """(q half, K/V half, causal) for each pair of local halves whose chunks attend: 0 first, 1 second.

    A q chunk sees all of an earlier chunk, the causal triangle of itself, nothing of a later one.
    """
    q_chunks, kv_chunks = chunk_ids(cp_rank, cp), chunk_ids(kv_rank, cp)
    return [(qi, ki, a == b) for qi, a in enumerate(q_chunks) for ki, b in enumerate(kv_chunks) if b <= a]


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Scaled scores of a q chunk [b, hkv, g, c, d] against a K chunk [b, hkv, c, d]: [b, hkv, g, c, c].

    The g query heads of a KV head share it by broadcasting, so K/V are never repeated.
    """
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        c = scores.shape[-1]
        above = torch.ones(c, c, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores


def _grouped(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, hq, s, d] -> [b, hkv, hq/hkv, s, d] in `dtype`: query heads grouped under their KV head."""
    b, hq, s, d = x.shape
    return x.to(dtype).reshape(b, hkv, hq // hkv, s, d)


class _RingAttention(torch.autograd.Function):
    """Ring attention over the CP group; computes in fp32 (fp64 if given) whatever the input dtype."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, group)
        out = out.to(q.dtype)
        # the output, not an fp32 copy: it is kept alive anyway, and rowsum(dO * O) needs no more
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, hq, s, d], log-sum-exp [b, hkv, g, s]) in the compute dtype.

    At step j this rank holds the K/V block that started on rank (rank - j) mod C. Each pair of
    chunks gives a normalised partial output and its log-sum-exp; the running output is
    rescaled to the merged log-sum-exp, which is exactly softmax over all keys seen so far.
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
        for qi, ki, causal in _block_pairs(rank, (rank - step) % cp, cp):
            qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
            scores = _scores(q[..., qs, :], k_blk[..., ks, :], causal, scale)
            blk_lse = scores.logsumexp(dim=-1)
            blk_out = torch.matmul(torch.exp(scores - blk_lse.unsqueeze(-1)), v_blk[..., ks, :].unsqueeze(2))
            new_lse = torch.logaddexp(lse[..., qs], blk_lse)
            old_weight = torch.exp(lse[..., qs] - new_lse).unsqueeze(-1)
            blk_weight = torch.exp(blk_lse - new_lse).unsqueeze(-1)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the compute dtype.

    The K/V blocks go round the ring again in the same order. Probabilities are recomputed from
    the final log-sum-exp; dQ accumulates here, while each block's dK/dV accumulate in a buffer
    that follows one step behind its block, so after C steps every buffer is back at its owner
    holding the sum over all ranks. Sending a buffer overlaps with the next step's compute.
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
        for qi, ki, causal in _block_pairs(rank, (rank - step) % cp, cp):
            qs, ks = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
            probs = torch.exp(_scores(q[..., qs, :], k_blk[..., ks, :], causal, scale) - lse[..., qs].unsqueeze(-1))
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
