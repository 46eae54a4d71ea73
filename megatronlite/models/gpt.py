"""One GPT decoder whose parts are chosen by `ModelConfig`'s features, built from tensor-parallel layers.

The features: RMSNorm or LayerNorm; rotary embeddings (half rotation, as HF and Megatron; with
llama3 / yarn long-context scaling) or learned positions; SwiGLU or GELU; biases on every linear
layer or on QKV only; per-head q/k RMSNorm (Qwen3); a sliding attention window (Mistral);
grouped-query attention with any head size; tied or untied output layer. No code here asks which
family a model is: `model.arch` only fills in the features (config.FAMILIES).

A `GPTModel` holds one pipeline stage: the layers it was given (named by their global index,
so parameter names never depend on the layout), plus the embedding on the first stage and the
final norm and output layer on the last. Activations are [batch, seq, hidden]; under sequence
parallelism each TP rank holds a block of the micro-batch's tokens between the attention and MLP
blocks (parallel/mappings.py), viewed as [batch, seq / TP, hidden].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatronlite import kernels
from megatronlite.config import ModelConfig
from megatronlite.kernels import OPS
from megatronlite.kernels.dispatch import backend_function
from megatronlite.kernels.reference import swiglu_halves
from megatronlite.models.moe import MoE, recompute_contexts
from megatronlite.models.precision import to_compute_dtype
from megatronlite.models.rope import rotary_tables
from megatronlite.parallel.context import context_attention, local_positions
from megatronlite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatronlite.parallel.mappings import copy_to_tp, gather_from_tp, gather_tokens, sequence_shard
from megatronlite.parallel.mesh import Group, Mesh
from megatronlite.parallel.sharding import empty_param, replicated
from megatronlite.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
)

Backends = Mapping[str, str]  # op -> resolved backend (megatronlite.kernels: torch | triton | apex | te)
Rotary = tuple[torch.Tensor, torch.Tensor]  # RoPE's cos and sin, [seq, head_dim] (packed: [batch, 1, seq, head_dim])


@dataclass(frozen=True)
class Packing:
    """The documents of one micro-batch (`data.document_mask`): attention stays inside each, positions restart."""

    documents: torch.Tensor  # [b, S] every token's document id over the whole sequence (each CP rank holds it all)
    positions: torch.Tensor  # [b, s_local] this rank's tokens' positions within their documents


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim (`size`), computed in fp32 like HF and Megatron.

    `partial_over_tp`: each TP rank's gradient is a partial sum (sequence parallelism; q/k norms, whose
    heads are split over TP)."""

    def __init__(self, kind: str, size: int, eps: float, partial_over_tp: bool, backends: Backends) -> None:
        super().__init__()
        self.rms, self.eps = kind == "rmsnorm", eps
        op = "rms_norm" if self.rms else "layer_norm"
        self.norm = backend_function(op, backends[op])
        self.weight = empty_param((size,), replicated((size,), "ones", partial_over_tp))
        self.bias = None if self.rms else empty_param((size,), replicated((size,), "zeros", partial_over_tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the compute dtype (under autocast, torch's norms return fp32: the SP gather after them and the
        matmul's input cast would move and read twice the bytes)."""
        if self.rms:
            return to_compute_dtype(self.norm(x, self.weight, self.eps))
        return to_compute_dtype(self.norm(x, self.weight, self.bias, self.eps))


def hidden_norm(cfg: ModelConfig, sequence_parallel: bool, backends: Backends) -> Norm:
    """A norm over the hidden size (before attention, before the MLP, after the last layer)."""
    return Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps, sequence_parallel, backends)


class Attention(nn.Module):
    """Causal self-attention with a fused, GQA-grouped QKV projection.

    The global QKV weight is laid out per KV group, [q heads of group 0; k0; v0; q of group 1; ...]
    (Megatron's layout), so a TP rank's contiguous slice holds whole groups.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh,
        sequence_parallel: bool,
        backends: Backends,
        selective: bool,
        context_attention: str = "ring",
    ):
        super().__init__()
        self.cfg, self.selective = cfg, selective
        self.context = mesh.role("context")  # CP: this rank holds two chunks of each sequence
        self.context_attention = context_attention
        self.apply_rotary = backend_function("rotary", backends["rotary"])
        self.groups = cfg.kv_heads // mesh.tp
        self.q_per_group = cfg.num_heads // cfg.kv_heads
        d = cfg.head_size
        qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * d
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, mesh, bias=cfg.qkv_bias, sequence_parallel=sequence_parallel
        )
        self.proj = RowParallelLinear(
            cfg.num_heads * d, cfg.hidden_size, mesh, bias=cfg.bias, sequence_parallel=sequence_parallel
        )
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # one weight shared by every head, whose heads are split over TP
            self.q_norm, self.k_norm = (Norm("rmsnorm", d, cfg.norm_eps, mesh.tp > 1, backends) for _ in "qk")

    def forward(self, x: torch.Tensor, rotary: Rotary | None, documents: torch.Tensor | None) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        d = self.cfg.head_size
        qkv = qkv.view(b, s, self.groups, self.q_per_group + 2, d)
        # one split (its backward writes the three gradients into one tensor, where slicing sums three)
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        q, k = q.reshape(b, s, -1, d), k.squeeze(3)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(3).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q, k = self.apply_rotary(q, cos, sin), self.apply_rotary(k, cos, sin)
        if self.selective and torch.is_grad_enabled():  # keep no s x s activations: recompute them in backward
            out = checkpoint(self._core, q, k, v, documents, use_reentrant=False)
        else:
            out = self._core(q, k, v, documents)
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
        group = self.context.pg if self.context.size > 1 else None  # one rank: masked_attention
        return context_attention(q, k, v, group, self.context_attention, self.cfg.sliding_window, documents)


class MLP(nn.Module):
    """SwiGLU with a fused [gate; up] projection, or fc1-GELU-fc2.

    A fused SwiGLU kernel reads gate and up from the one fused GEMM output. The pure-torch path
    instead runs one GEMM per half (the weight's halves are views) so silu and the product read
    contiguous memory: on CPU that is faster than one GEMM plus strided elementwise ops.
    """

    def __init__(self, cfg: ModelConfig, mesh: Mesh, sequence_parallel: bool, backends: Backends) -> None:
        super().__init__()
        self.gated = cfg.gated
        self.split_halves = backends["swiglu"] == "torch"
        self.swiglu = None if self.split_halves else backend_function("swiglu", backends["swiglu"])
        f, h = cfg.ffn_size, cfg.hidden_size
        parts = ("gate", "up") if self.gated else ()
        self.fc1 = ColumnParallelLinear(
            h, f * len(parts or "x"), mesh, bias=cfg.bias, parts=parts, sequence_parallel=sequence_parallel
        )
        self.fc2 = RowParallelLinear(f, h, mesh, bias=cfg.bias, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated and self.split_halves:
            gate, up = self.fc1.forward_parts(x)
            y = swiglu_halves(gate, up)
        elif self.gated:
            y = self.swiglu(self.fc1(x))
        else:
            y = F.gelu(self.fc1(x), approximate="tanh")
        return self.fc2(y)


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs, not what it computes: the numbers are the same for every choice here."""

    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective (the attention core) | full (whole layers)
    recompute_layers: int = 0  # full: recompute this stage's first N layers (0: all of them)
    kernels: Backends = field(default_factory=lambda: dict.fromkeys(OPS, "torch"))  # see trainer.run_options
    fused_cross_entropy: bool = False  # output layer + loss in token chunks, never the full logits
    context_attention: str = "ring"  # CP > 1: ring | allgather (parallel.context_attention)
    masked_loss: bool = False  # labels < 0 do not count (data.eod_mask_loss); the unfused loss path


def masked_mean(losses: torch.Tensor, keep: torch.Tensor, context: Group) -> torch.Tensor:
    """The mean of `losses` where `keep` is 1 over the whole sequence, as this CP rank's share: the CP ranks'
    values average to it (each divides its own sum by the sequence's count / CP)."""
    count = keep.sum()
    if context.size > 1:
        count = count.detach().clone()
        dist.all_reduce(count, group=context.pg)
    return (losses * keep).sum() * context.size / count.clamp(min=1)


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, mesh: Mesh, sequence_parallel: bool, options: RunOptions, experts: bool = False
    ) -> None:
        super().__init__()
        backends, selective = options.kernels, options.recompute == "selective"
        self.attn_norm = hidden_norm(cfg, sequence_parallel, backends)
        self.attention = Attention(cfg, mesh, sequence_parallel, backends, selective, options.context_attention)
        self.mlp_norm = hidden_norm(cfg, sequence_parallel, backends)
        mlp = MoE if experts else MLP  # experts: a mixture of experts in place of the MLP (model.moe)
        self.mlp = mlp(cfg, mesh, sequence_parallel, backends)

    def forward(self, x: torch.Tensor, rotary: Rotary | None, documents: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), rotary, documents)
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, padded_vocab: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.word = VocabParallelEmbedding(cfg.vocab_size, padded_vocab, cfg.hidden_size, mesh, sequence_parallel)
        self.position = None
        if cfg.position == "learned":
            shape = (cfg.max_seq_len, cfg.hidden_size)
            self.position = empty_param(shape, replicated(shape, partial_over_tp=sequence_parallel))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`positions`: the positions of `ids` [s] (this CP rank's chunks of the sequence) or, packed, [b, s]."""
        x = self.word(ids)  # [b, s / TP under sequence parallelism, h]
        if self.position is not None:
            if self.sequence_parallel:  # this rank's block of the micro-batch's tokens (mappings.py)
                positions = sequence_shard(positions.expand(ids.shape), self.mesh.tp_rank, self.mesh.tp)
            x = x + self.position[positions]
        return to_compute_dtype(x)  # the residual stream in the compute dtype, as Megatron's (and PP's sends)


class GPTModel(nn.Module):
    """One pipeline stage (all of the model when there is one stage)."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh | None = None,
        layer_ids: list[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        options: RunOptions | None = None,
    ) -> None:
        super().__init__()
        mesh = mesh or Mesh()
        options = options or RunOptions()
        self.cfg, self.mesh, self.options = cfg, mesh, options
        self.sequence_parallel = sp = options.sequence_parallel and mesh.tp > 1
        self.padded_vocab = cfg.padded_vocab_size(mesh.tp)
        layer_ids = list(range(cfg.num_layers)) if layer_ids is None else layer_ids
        self.pre_process, self.post_process = pre_process, post_process
        k = options.kernels
        self.embedding = Embedding(cfg, mesh, self.padded_vocab, sp) if pre_process else None
        experts = cfg.moe.layers(cfg.num_layers)
        self.layers = nn.ModuleDict({str(i): Block(cfg, mesh, sp, options, experts[i]) for i in layer_ids})
        n_full = (options.recompute_layers or len(layer_ids)) if options.recompute == "full" else 0
        self.recomputed = set(list(self.layers)[:n_full])
        self.final_norm = hidden_norm(cfg, sp, k) if post_process else None
        self.output = None
        if post_process and not (cfg.tied and pre_process):
            # tied: the last stage's copy of the first stage's embedding, kept in sync
            alias = "embedding.word.weight" if cfg.tied else None
            self.output = ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, mesh, padded=self.padded_vocab, alias=alias
            )
        self._positional: tuple[tuple[int, torch.device], torch.Tensor, Rotary | None] | None = None

    def output_weight(self) -> torch.Tensor:
        return self.output.weight if self.output is not None else self.embedding.word.weight

    def positional(self, local_len: int, device: torch.device) -> tuple[torch.Tensor, Rotary | None]:
        """This rank's true token positions (contiguous, or under CP its two chunks') and RoPE's cos and sin at
        them (rotary models). Made once per sequence length and device, so a step never waits on the host for them."""
        key = (local_len, device)
        if self._positional is None or self._positional[0] != key:
            context = self.mesh.role("context")
            positions = local_positions(local_len, context.rank, context.size, device)
            rotary = rotary_tables(self.cfg, positions) if self.cfg.position == "rope" else None
            self._positional = (key, positions, rotary)
        return self._positional[1], self._positional[2]

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        """First stage: x is token ids [b, s]; later stages: hidden states from the previous stage.

        The last stage returns the mean loss when given labels (the vocabulary stays sharded; labels < 0
        do not count), else logits over the real (unpadded) vocabulary, gathered over TP.
        """
        x = self.hidden(x, packing)
        if not self.post_process:
            return x
        return self.loss(x, labels) if labels is not None else self.logits(x)

    def hidden(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """The stage without the output layer: what a pipeline stage sends on (the last stage's is normed)."""
        documents = None
        if packing is None:
            local_len = x.shape[1] * (self.mesh.tp if self.sequence_parallel and not self.pre_process else 1)
            positions, rotary = self.positional(local_len, x.device)
        else:
            documents, positions = packing.documents, packing.positions
            rotary = None
            if self.cfg.position == "rope":
                rotary = tuple(t.unsqueeze(1) for t in rotary_tables(self.cfg, positions))  # [b, 1, s, d]
        if self.pre_process:
            x = self.embedding(x, positions)
        for name, layer in self.layers.items():
            if name in self.recomputed and torch.is_grad_enabled():
                x = checkpoint(layer, x, rotary, documents, use_reentrant=False, context_fn=recompute_contexts)
            else:
                x = layer(x, rotary, documents)
        return self.final_norm(x) if self.post_process else x

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(Last stage.) The mean cross-entropy of the final hidden states: the one loss path, with or without PP."""
        if self.options.fused_cross_entropy:  # output layer + loss in token chunks, never the full logits
            group = self.mesh.tp_group
            x = gather_tokens(x, group) if self.sequence_parallel else copy_to_tp(x, group)
            return kernels.linear_cross_entropy(
                x,
                self.output_weight(),
                labels,
                self.cfg.vocab_size,
                self.mesh.tp_group,
                self.options.kernels["linear_cross_entropy"],
            )
        logits = column_parallel_linear(x, self.output_weight(), None, self.mesh, self.sequence_parallel)
        if not self.options.masked_loss:
            return vocab_parallel_cross_entropy(logits, labels, self.cfg.vocab_size, self.mesh).mean()
        losses = vocab_parallel_cross_entropy(logits, labels.clamp(min=0), self.cfg.vocab_size, self.mesh)
        return masked_mean(losses, (labels >= 0).to(losses.dtype), self.mesh.role("context"))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(Last stage.) Logits over the real vocabulary, gathered over TP."""
        logits = column_parallel_linear(x, self.output_weight(), None, self.mesh, self.sequence_parallel)
        if self.mesh.tp > 1:
            logits = gather_from_tp(logits, -1, self.mesh.tp_group)
        return logits[..., : self.cfg.vocab_size]
