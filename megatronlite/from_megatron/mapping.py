"""Megatron-LM args as megatronlite config keys: each value Megatron would use, mapped exactly or reported.

Every key is written with the value Megatron-LM runs with, given or defaulted (its defaults differ from
ours: weight decay 0.01, Adam's beta2 0.999, linear decay, dropout 0.1, eval every 1000 steps), so the
config does not lean on megatronlite's defaults. Model features are read as `convert --from megatron` reads
them (`convert.megatron.features`, the same tables), except that a feature megatronlite lacks is reported
here instead of refused: a training config can still be written, with the difference listed.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatronlite.config import ModelConfig
from megatronlite.convert.fields import COUNT, NUMBER, POSITIVE, TEXT, Kind, check
from megatronlite.convert.presets import closest_arch
from megatronlite.errors import UserError
from megatronlite.from_megatron.flags import BY_DEST, DERIVED, lookup_dest

GPT2_VOCAB = 50257  # GPT2BPETokenizer's vocabulary (GPT-2's vocab.json)
LEGACY_SPLIT = "969,30,1"  # Megatron-LM's split when --data-path is given without --split
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr")
PAIR = Kind(
    "a (left, right) pair of integers",
    lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(type(x) is int for x in v),
)
# what Megatron-LM accepts for each arg the mapping computes with: a script's or a checkpoint's value is checked
# before use (an arg not given holds Megatron's default)
ARG_KINDS: dict[str, Kind] = {
    **dict.fromkeys(
        """num_layers hidden_size num_attention_heads num_query_groups kv_channels ffn_hidden_size seq_length
        max_position_embeddings vocab_size padded_vocab_size make_vocab_size_divisible_by moe_router_topk
        tensor_model_parallel_size pipeline_model_parallel_size context_parallel_size expert_model_parallel_size
        virtual_pipeline_model_parallel_size num_layers_per_virtual_pipeline_stage num_virtual_stages_per_pipeline_rank
        micro_batch_size global_batch_size train_iters train_samples""".split(),
        POSITIVE,
    ),
    **dict.fromkeys(
        """num_experts decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers recompute_num_layers
        lr_decay_iters lr_decay_samples lr_warmup_iters lr_warmup_samples lr_wsd_decay_iters lr_wsd_decay_samples
        eval_interval eval_iters save_interval log_interval""".split(),
        COUNT,
    ),
    **dict.fromkeys(
        """lr min_lr lr_warmup_fraction weight_decay adam_beta1 adam_beta2 adam_eps clip_grad init_method_std
        attention_dropout hidden_dropout initial_loss_scale moe_aux_loss_coeff""".split(),
        NUMBER,
    ),
    **dict.fromkeys(
        "normalization position_embedding_type lr_decay_style split tokenizer_type tokenizer_model".split(), TEXT
    ),
    "window_size": PAIR,
}


@dataclass
class Report:
    """What became of each flag: mapped to a key, approximated, unmapped, unknown or ignored; and notes."""

    mapped: list[str] = field(default_factory=list)
    approximated: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    SECTIONS = (
        ("unmapped", "unmapped (megatronlite has no equivalent: the run differs)"),
        ("approximated", "approximated (mapped to the nearest megatronlite setting: the math differs slightly)"),
        ("unknown", "unknown (not a Megatron-LM flag megatronlite knows)"),
        ("ignored", "ignored (no effect on the run's math)"),
        ("notes", "notes"),
    )

    def lines(self) -> list[str]:
        """The report as text lines: one block per non-empty section."""
        out = []
        for name, title in self.SECTIONS:
            items = getattr(self, name)
            if items:
                out.append(f"{title}:")
                out += [f"  {item}" for item in items]
        return out


class Args:
    """Megatron-LM's args of one run: the values given over Megatron's defaults. Remembers which ones the
    mapping read, so that every other given flag is reported."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.read: set[str] = set()

    def __getitem__(self, dest: str) -> Any:
        self.read.add(dest)
        value = self.values.get(dest)
        if value is None and dest in BY_DEST:
            return BY_DEST[dest].default
        return value

    def touch(self, *dests: str) -> None:
        """Mark args as read whose values the mapping takes from elsewhere (a checkpoint's derived ones)."""
        self.read.update(dests)


# model.moe keys taken from Megatron's args as they are, where set
MOE_OPTIONAL = {
    "ffn_hidden_size": "moe_ffn_hidden_size",
    "shared_expert_ffn_hidden_size": "moe_shared_expert_intermediate_size",
    "scaling_factor": "moe_router_topk_scaling_factor",
    "z_loss_coeff": "moe_z_loss_coeff",
}


def _layer_pattern(freq: Any, layers: int, where: str) -> int | list[int]:
    """--moe-layer-freq: an int N (every N-th layer), or the Python list expression Megatron evaluates, e.g.
    "([0]*3+[1]*29)", read here without evaluating anything but list literals, + and * by an int."""
    if isinstance(freq, int):
        return freq
    if isinstance(freq, list):
        return [int(x) for x in freq]

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(left, int) and isinstance(right, int):
                return left * right
            items, times = (left, right) if isinstance(left, list) else (right, left)
            if not (isinstance(items, list) and isinstance(times, int)) or len(items) * times > 10**6:
                raise ValueError  # a list times a count, and never larger than any model's layers
            return items * times
        raise ValueError

    try:
        pattern = value(ast.parse(str(freq).strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        pattern = None
    if not (isinstance(pattern, list) and len(pattern) == layers and set(pattern) <= {0, 1}):
        raise UserError(f"{where}: --moe-layer-freq {freq!r}: expected an integer or a 0/1 list of {layers} layers")
    return pattern


def _flag_name(dest: str) -> str:
    flag = lookup_dest(dest)
    return "--" + (flag.name if flag else dest.replace("_", "-"))


def _check_args(values: dict[str, Any], where: str) -> None:
    """Every arg the mapping computes with is of the kind Megatron-LM accepts: one line naming it, not a crash."""
    for dest, kind in ARG_KINDS.items():
        if values.get(dest) is not None:
            check(values[dest], kind, where, _flag_name(dest) if lookup_dest(dest) else f"args.{dest}")


def _number(value: float) -> int | float:
    """A float that is a whole number as an int (for steps), else as it is."""
    return int(value) if float(value).is_integer() else value


class Mapper:
    """Builds the config sections from `Args`; what cannot be mapped exactly goes to the report."""

    def __init__(self, args: Args, given: dict[str, str], where: str, world_size: int | None) -> None:
        _check_args(args.values, where)
        self.a, self.given, self.where, self.world_size = args, given, where, world_size
        self.report = Report()
        self.flagged: set[str] = set()

    # --- reporting --------------------------------------------------------------------------------

    def _differs(self, section: str, dest: str, why: str) -> None:
        """A flag given that cannot be mapped exactly; when Megatron's default is what differs, a note."""
        self.flagged.add(dest)
        if dest in self.given:
            getattr(self.report, section).append(f"{self.given[dest]}: {why}")
        else:
            self.report.notes.append(f"{_flag_name(dest)} not given, Megatron's default {self.a[dest]!r}: {why}")

    def unmapped(self, dest: str, why: str) -> None:
        self._differs("unmapped", dest, why)

    def approximated(self, dest: str, why: str) -> None:
        self._differs("approximated", dest, why)

    def inert(self, dest: str, why: str) -> None:
        """A flag given that has no effect in this run (Megatron ignores it too)."""
        self.flagged.add(dest)
        if dest in self.given:
            self.report.ignored.append(f"{self.given[dest]} ({why})")

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def finish(self, unknown: list[str]) -> Report:
        """Classify every given flag the mapping did not flag: mapped (read), ignored, unmapped or unknown."""
        r = self.report
        r.unknown += unknown
        for dest, shown in self.given.items():
            if dest in self.flagged:
                continue
            flag = lookup_dest(dest)
            if flag is None:
                r.unknown.append(shown)
            elif dest in self.a.read and flag.role == "mapped":
                r.mapped.append(shown)
            elif flag.when and not self.a.values.get(flag.when):
                r.ignored.append(f"{shown} (no effect without {_flag_name(flag.when)})")
            elif flag.role == "ignored":
                r.ignored.append(f"{shown} ({flag.why})")
            else:
                r.unmapped.append(f"{shown}: {flag.why or 'no megatronlite equivalent'}")
        return r

    def require(self, *dests: str) -> None:
        missing = [_flag_name(d) for d in dests if self.a[d] is None]
        if missing:
            raise UserError(f"{self.where}: {', '.join(missing)} not given; Megatron-LM needs it to train")

    # --- the sections -------------------------------------------------------------------------------

    def config(self, name: str) -> dict:
        self.require(*REQUIRED)
        if self.a["train_iters"] is None and self.a["train_samples"] is None:
            raise UserError(f"{self.where}: neither --train-iters nor --train-samples given; one sets the run's length")
        model = self.model()
        train = self.train(model["max_seq_len"])
        return {
            "name": name,
            "model": model,
            "parallel": self.parallel(model["num_layers"]),
            "train": train,
            "optim": self.optim(train["steps"], train["global_batch_size"]),
            "data": self.data(),
            "checkpoint": self.checkpoint(),
            "logging": self.logging(),
        }

    def features(self) -> dict:
        """The model's features, read by convert's `features` once what megatronlite lacks is reported and set aside."""
        from megatronlite.convert.megatron import ABSENT, DEFAULTS, NORMS, POSITIONS, features

        a = self.a
        values = {key: a[key] for key in DEFAULTS}
        for key, off in ABSENT.items():
            if a[key] not in (off, None):
                if key == "apply_layernorm_1p":
                    self.approximated(
                        key,
                        "the norm's weight stored as 1 + w: the same function, but weight decay "
                        "pulls w toward 0, not the weight toward 0",
                    )
                else:
                    self.unmapped(key, f"megatronlite has no {key.replace('_', ' ')} (only {off!r})")
            values[key] = off
        if values["normalization"] not in NORMS:
            self.unmapped("normalization", f"megatronlite has {', '.join(NORMS)}")
            values["normalization"] = "LayerNorm"
        if a["use_rotary_position_embeddings"]:
            values["position_embedding_type"] = "rope"
        position = values["position_embedding_type"]
        if position not in POSITIONS:
            self.unmapped("position_embedding_type", "megatronlite has rope and learned_absolute positions")
            values["position_embedding_type"] = "rope" if position in ("yarn", "mrope") else "learned_absolute"
        elif position == "learned_absolute" and not a["add_position_embedding"]:
            self.unmapped("add_position_embedding", "megatronlite has no model without position embeddings")
        if a["quick_geglu"]:
            self.unmapped("quick_geglu", "megatronlite's activations are swiglu and gelu")
        if not (values["swiglu"] or values["openai_gelu"]):
            if not (a["quick_geglu"] or a["squared_relu"]):
                self.note(
                    "neither --swiglu nor --openai-gelu: Megatron's GELU is the exact (erf) one; model.activation gelu "
                    "is the tanh approximation (--openai-gelu), slightly different"
                )
            values["openai_gelu"] = True
        qk_layernorm = bool(values["qk_layernorm"]) and values["normalization"] == "LayerNorm"
        if qk_layernorm:
            self.approximated(
                "qk_layernorm", "q/k LayerNorm (with --normalization LayerNorm); megatronlite's qk_norm is an RMSNorm"
            )
            values["qk_layernorm"] = False
        window = values["window_size"]
        if window is not None and not (len(window) == 2 and window[1] == 0):
            self.unmapped("window_size", "megatronlite's sliding window is causal: (left, 0)")
            values["window_size"] = None
        found = features(values, self.where)
        found["qk_norm"] = bool(found["qk_norm"] or qk_layernorm)
        return found

    def model(self) -> dict:
        a = self.a
        found = self.features()
        hidden, heads = a["hidden_size"], a["num_attention_heads"]
        ffn = a["ffn_hidden_size"]
        if ffn is None:  # Megatron's default (arguments.py), not ours
            ffn = int((4 * hidden * 2 / 3) / 64) * 64 if found["activation"] == "swiglu" else 4 * hidden
            self.note(f"--ffn-hidden-size not given: Megatron's default for this model, {ffn}")
        kv_channels = a["kv_channels"]
        if not a["group_query_attention"] and "num_query_groups" in self.given:
            self.inert("num_query_groups", "no effect without --group-query-attention")
        if not a["use_rope_scaling"] and "rope_scaling_factor" in self.given:
            self.inert("rope_scaling_factor", "no effect without --use-rope-scaling")
        for dest in ("attention_dropout", "hidden_dropout"):
            if a[dest]:
                self.unmapped(dest, "megatronlite trains without dropout")
        seq, max_positions = a["seq_length"], a["max_position_embeddings"]
        if max_positions is None:
            self.note(f"--max-position-embeddings not given (Megatron-LM requires it): model.max_seq_len is {seq}")
        arch = closest_arch(found)
        model = {
            "arch": arch,
            "num_layers": a["num_layers"],
            "hidden_size": hidden,
            "num_heads": heads,
            "num_kv_heads": a["num_query_groups"] if a["group_query_attention"] else heads,
            "head_dim": kv_channels if kv_channels not in (None, hidden // heads) else None,
            "ffn_hidden_size": ffn,
            "vocab_size": self.vocab_size(),
            "max_seq_len": max_positions or seq,
            "make_vocab_size_divisible_by": a["make_vocab_size_divisible_by"],
            "init_std": a["init_method_std"],
        }
        if model["head_dim"] is None:
            del model["head_dim"]
        experts = self.moe(a["num_layers"])
        return {**model, **_features_beyond(arch, found), **({"moe": experts} if experts else {})}

    def moe(self, layers: int) -> dict | None:
        """model.moe from --num-experts and the --moe-* flags (None: a dense model)."""
        a = self.a
        if not a["num_experts"]:
            return None
        score = a["moe_router_score_function"]
        if score not in ("softmax", "sigmoid"):
            self.unmapped("moe_router_score_function", "model.moe.router is softmax or sigmoid")
        out: dict[str, Any] = {
            "num_experts": a["num_experts"],
            "top_k": a["moe_router_topk"],
            "router": "sigmoid" if score == "sigmoid" else "softmax",
            # softmax over the top k's logits (renormalised) unless --moe-router-pre-softmax; sigmoid: renormalised
            # when more than one expert is chosen (megatron-core's topk_routing_with_score_function)
            "normalize_top_k": a["moe_router_topk"] > 1 if score == "sigmoid" else not a["moe_router_pre_softmax"],
            "layer_freq": _layer_pattern(a["moe_layer_freq"], layers, self.where),
        }
        out.update({key: a[dest] for key, dest in MOE_OPTIONAL.items() if a[dest]})
        if a["moe_shared_expert_gate"] and a["moe_shared_expert_intermediate_size"]:
            out["shared_expert_gate"] = True  # the shared expert's output times sigmoid(x . w)
        balance = a["moe_router_load_balancing_type"]
        if balance not in ("aux_loss", "global_aux_loss", "none"):
            self.approximated(
                "moe_router_load_balancing_type",
                f"{balance}: model.moe's balance loss is per micro-batch (Megatron's aux_loss) or over the global "
                "batch (global_aux_loss)",
            )
        if balance == "global_aux_loss":
            out["aux_loss_scope"] = "global"
        out["aux_loss_coeff"] = 0.0 if balance == "none" else float(a["moe_aux_loss_coeff"] or 0.0)
        if a["moe_router_enable_expert_bias"]:
            out["bias_update_rate"] = a["moe_router_bias_update_rate"]
        if a["moe_expert_capacity_factor"]:
            out["capacity_factor"] = a["moe_expert_capacity_factor"]
            self.approximated(
                "moe_expert_capacity_factor",
                "megatronlite drops the latest tokens over capacity; Megatron's default drops the least probable",
            )
        if a["expert_tensor_parallel_size"] not in (None, 1):
            self.unmapped("expert_tensor_parallel_size", "megatronlite's experts are whole on every TP rank (1)")
        return out

    def vocab_size(self) -> int:
        """The tokenizer's vocabulary: --vocab-size, GPT-2's for its BPE, or the tokenizer.json's where it is here."""
        a = self.a
        if a["vocab_size"]:
            return a["vocab_size"]
        kind, path = a["tokenizer_type"], a["tokenizer_model"]
        if kind == "GPT2BPETokenizer":
            return GPT2_VOCAB
        if path and kind == "HuggingFaceTokenizer" and Path(path).exists():
            from megatronlite.data.tokenizers import build_tokenizer

            size = build_tokenizer(path).vocab_size
            self.note(f"model.vocab_size {size}: the vocabulary of the tokenizer at {path}")
            return size
        padded = self.a.values.get("padded_vocab_size")
        if padded:
            self.note(f"model.vocab_size {padded}: only the padded vocabulary is recorded; set the tokenizer's size")
            return padded
        raise UserError(
            f"{self.where}: the vocabulary size is not known: add --vocab-size N (the tokenizer's), "
            "--tokenizer-type GPT2BPETokenizer, or a HuggingFaceTokenizer --tokenizer-model that exists here"
        )

    def parallel(self, layers: int) -> dict:
        a = self.a
        tp, pp, cp = a["tensor_model_parallel_size"], a["pipeline_model_parallel_size"], a["context_parallel_size"]
        out: dict[str, Any] = {"tensor": tp, "pipeline": pp, "context": cp}
        vpp = self.virtual_pipeline(layers, pp)
        if vpp > 1:
            out["virtual_pipeline"] = vpp
        uneven = self.uneven_stages(layers, pp, vpp)
        if uneven:
            out["pipeline_layers"] = uneven
        if cp > 1:
            kinds = a["cp_comm_type"]
            kinds = {kinds} if isinstance(kinds, str) else set(kinds)
            attention = {frozenset({"p2p"}): "ring", frozenset({"all_gather"}): "allgather"}.get(frozenset(kinds))
            if attention:
                out["context_attention"] = attention
            else:
                self.unmapped("cp_comm_type", "megatronlite's context attention is ring (p2p) or allgather")
        elif "cp_comm_type" in self.given:
            self.inert("cp_comm_type", "no effect at context-parallel size 1")
        if a["sequence_parallel"] and tp == 1:
            self.inert("sequence_parallel", "Megatron turns it off at tensor-parallel size 1")
        out["sequence_parallel"] = bool(a["sequence_parallel"]) and tp > 1
        out["distributed_optimizer"] = bool(a["use_distributed_optimizer"])
        if a["num_experts"] and a["expert_model_parallel_size"] > 1:
            out["expert"] = a["expert_model_parallel_size"]
        return out

    def virtual_pipeline(self, layers: int, pp: int) -> int:
        """Virtual stages per pipeline rank, as Megatron derives them (or as a checkpoint recorded them)."""
        a = self.a
        recorded = a.values.get("virtual_pipeline_model_parallel_size")
        if recorded:
            a.touch("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank")
            return recorded
        if a["num_virtual_stages_per_pipeline_rank"]:
            return a["num_virtual_stages_per_pipeline_rank"]
        per_virtual = a["num_layers_per_virtual_pipeline_stage"]
        if not per_virtual:
            return 1
        per_stage = layers // pp
        if layers % pp or per_stage % per_virtual:
            raise UserError(
                f"{self.where}: --num-layers-per-virtual-pipeline-stage {per_virtual} does not divide the "
                f"{per_stage} layers of each of the {pp} pipeline stages"
            )
        return per_stage // per_virtual

    def uneven_stages(self, layers: int, pp: int, vpp: int) -> list[int] | None:
        """Layers per stage for --decoder-first/last-pipeline-num-layers: the rest split evenly, as Megatron does."""
        first, last = self.a["decoder_first_pipeline_num_layers"], self.a["decoder_last_pipeline_num_layers"]
        if first is None and last is None:
            return None
        middle_stages = pp - (first is not None) - (last is not None)
        rest = layers - (first or 0) - (last or 0)
        if vpp > 1 or middle_stages < 0 or (middle_stages and rest % middle_stages) or (not middle_stages and rest):
            for dest in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
                if self.a[dest] is not None:
                    self.unmapped(dest, "an uneven split parallel.pipeline_layers cannot express")
            return None
        even = [rest // middle_stages] * middle_stages if middle_stages else []
        return ([first] if first is not None else []) + even + ([last] if last is not None else [])

    def train(self, max_seq_len: int) -> dict:
        a = self.a
        mbs, gbs = a["micro_batch_size"], a["global_batch_size"]
        if gbs is None:
            dp = self.data_parallel()
            gbs = mbs * (dp or 1)
            self.note(
                f"--global-batch-size not given: Megatron uses micro-batch x data-parallel size, {gbs}"
                + ("" if dp else " at one data-parallel rank; set train.global_batch_size for your job")
            )
        if a["train_samples"] is not None:
            steps = a["train_samples"] // gbs
            if not steps:
                raise UserError(
                    f"{self.where}: --train-samples {a['train_samples']} is less than one global batch ({gbs}): "
                    "Megatron-LM would run no step"
                )
            a.touch("train_iters")  # a checkpoint records the steps Megatron derived from the samples: the same
            if a["train_samples"] % gbs:
                exact = a["train_samples"] / gbs
                self.note(f"--train-samples {a['train_samples']} is {exact:.2f} steps; Megatron runs {steps}")
        else:
            steps = a["train_iters"]
        if a["fp16"] and a["bf16"]:
            raise UserError(f"{self.where}: --fp16 and --bf16 both given; Megatron-LM takes one")
        train = {
            "steps": steps,
            "micro_batch_size": mbs,
            "global_batch_size": gbs,
            "seq_len": a["seq_length"],
            "seed": a["seed"],
            "precision": "fp16" if a["fp16"] else "bf16" if a["bf16"] else "fp32",
            **self.recompute(),
        }
        if a["eval_iters"] and a["eval_interval"]:
            train.update(eval_interval=a["eval_interval"], eval_iters=a["eval_iters"])
        else:
            train["eval_interval"] = 0
        return train

    def data_parallel(self) -> int | None:
        a, world = self.a, self.world_size
        model_ranks = a["tensor_model_parallel_size"] * a["pipeline_model_parallel_size"] * a["context_parallel_size"]
        return world // model_ranks if world and world % model_ranks == 0 else None

    def recompute(self) -> dict:
        """train.recompute (and recompute_layers) from Megatron's granularity, method and layer count."""
        a = self.a
        granularity = a["recompute_granularity"] or ("selective" if a["recompute_activations"] else None)
        method, count = a["recompute_method"], a["recompute_num_layers"]
        if granularity != "full":
            for dest in ("recompute_method", "recompute_num_layers"):
                if dest in self.given:
                    self.inert(dest, "no effect without --recompute-granularity full")
            return {"recompute": granularity or "none"}
        # block: the first N layers of each stage; uniform: every layer, in chunks of N (megatronlite: one by one)
        return {"recompute": "full", "recompute_layers": count if method == "block" and count else 0}

    def optim(self, steps: int, gbs: int) -> dict:
        a = self.a
        optim: dict[str, Any] = {"lr": a["lr"], "min_lr": a["min_lr"]}
        if a["optimizer"] != "adam":
            self.unmapped("optimizer", "megatronlite's optimizer is AdamW (Megatron's adam)")
        samples = a["train_samples"] is not None
        decay_dest = "lr_decay_samples" if samples else "lr_decay_iters"
        decay = a[decay_dest]
        decay_steps = steps if decay is None else (decay / gbs if samples else decay)
        optim.update(self.schedule(steps, decay_steps, decay_dest, gbs))
        optim.update(
            weight_decay=a["weight_decay"],
            beta1=a["adam_beta1"],
            beta2=a["adam_beta2"],
            eps=a["adam_eps"],
            clip_grad=a["clip_grad"],
        )
        if a["lr_warmup_init"]:
            self.unmapped("lr_warmup_init", "megatronlite's warmup starts from 0")
        if a["optimizer_cpu_offload"]:
            optim["offload"] = True
            if a["optimizer_offload_fraction"] != 1.0:
                self.unmapped("optimizer_offload_fraction", "megatronlite offloads all of Adam's state or none")
        elif "optimizer_offload_fraction" in self.given:
            self.inert("optimizer_offload_fraction", "no effect without --optimizer-cpu-offload")
        optim.update(self.loss_scale())
        return optim

    def schedule(self, steps: int, decay_steps: float, decay_dest: str, gbs: int) -> dict:
        """optim.schedule, warmup_steps and decay_fraction; megatronlite decays over all of train.steps."""
        a = self.a
        style = a["lr_decay_style"]
        schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant", "WSD": "wsd"}.get(style)
        if schedule is None:
            self.unmapped("lr_decay_style", "megatronlite's schedules are cosine, linear, constant and WSD")
            schedule = "cosine"
        out: dict[str, Any] = {"schedule": schedule}
        if schedule != "constant" and not math.isclose(decay_steps, steps):
            self.unmapped(
                decay_dest,
                f"Megatron decays over {_number(round(decay_steps, 2))} steps, then holds --min-lr; megatronlite "
                f"decays over all of train.steps ({steps})",
            )
        if a["lr_warmup_fraction"] is not None:
            warmup = a["lr_warmup_fraction"] * decay_steps
            dest = "lr_warmup_fraction"
        elif a["train_samples"] is not None:
            warmup, dest = a["lr_warmup_samples"] / gbs, "lr_warmup_samples"
        else:
            warmup, dest = a["lr_warmup_iters"], "lr_warmup_iters"
        out["warmup_steps"] = math.ceil(warmup - 1e-9)
        if out["warmup_steps"] != warmup:
            self.approximated(dest, f"{warmup:.2f} warmup steps; warmup_steps {out['warmup_steps']}")
        if schedule == "wsd":
            out.update(self.wsd(steps, gbs))
        else:
            for dest in ("lr_wsd_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_samples"):
                if dest in self.given:
                    self.inert(dest, "no effect without --lr-decay-style WSD")
        return out

    def wsd(self, steps: int, gbs: int) -> dict:
        a = self.a
        if a["lr_wsd_decay_style"] != "linear":
            self.approximated("lr_wsd_decay_style", "megatronlite's WSD decays linearly")
        samples = a["lr_wsd_decay_samples"]
        decay = samples / gbs if samples is not None else a["lr_wsd_decay_iters"]
        if decay is None:
            self.note("--lr-decay-style WSD without --lr-wsd-decay-iters: optim.decay_fraction keeps its default")
            return {}
        return {"decay_fraction": round(decay / steps, 6)}

    def loss_scale(self) -> dict:
        """fp16's dynamic loss scale: the initial scale maps; a static scale, its window and hysteresis do not."""
        a = self.a
        dests = ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
        if not a["fp16"]:
            for dest in dests:
                if dest in self.given:
                    self.inert(dest, "no effect without --fp16")
            return {}
        if a["loss_scale"] is not None:
            self.unmapped("loss_scale", "a static loss scale; megatronlite's is dynamic")
        if a["min_loss_scale"] != 1.0:
            self.unmapped("min_loss_scale", "megatronlite's loss scale never drops below 1")
        if a["loss_scale_window"] != 1000:
            self.unmapped("loss_scale_window", "megatronlite doubles the loss scale after 1000 good steps")
        if a["hysteresis"] != 1:
            self.unmapped("hysteresis", "megatronlite halves the loss scale at every overflow (hysteresis 1)")
        return {"initial_loss_scale": float(a["initial_loss_scale"])}

    def data(self) -> dict:
        a = self.a
        data: dict[str, Any] = {}
        sources = self.sources()
        if sources:
            data["sources"] = sources
            data["split"] = ",".join(x.strip() for x in (a["split"] or LEGACY_SPLIT).split(","))
        elif a["split"] is not None:
            data["split"] = ",".join(x.strip() for x in a["split"].split(","))
        tokenizer = self.tokenizer()
        if tokenizer:
            data["tokenizer"] = tokenizer
        if a["data_cache_path"]:
            data["cache_dir"] = a["data_cache_path"]
        reset = {"reset_position_ids": a["reset_position_ids"], "reset_attention_mask": a["reset_attention_mask"]}
        if all(reset.values()):
            data["document_mask"] = True
        for dest, on in reset.items():
            if on and not all(reset.values()):
                self.unmapped(dest, "data.document_mask resets positions and the attention mask together")
        data["eod_mask_loss"] = bool(a["eod_mask_loss"])
        return data

    def sources(self) -> list[dict] | None:
        """data.sources from --data-path: `W1 P1 W2 P2 ...` weighted, or prefixes only (Megatron: blended by size)."""
        a = self.a
        if a["mock_data"]:
            self.unmapped("mock_data", "random tokens; megatronlite's stand-in data is builtin:stdlib (its default)")
        words = [w for item in (a["data_path"] or []) for w in str(item).split()]
        if not words:
            if not a["mock_data"]:
                self.note("no --data-path: data.sources stays megatronlite's default (builtin:stdlib)")
            return None
        pairs = [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2)] if len(words) % 2 == 0 else []
        try:
            return [{"path": path, "weight": float(weight)} for weight, path in pairs] or _prefixes(self, words)
        except ValueError:  # a prefix where a weight would be: prefixes only, as Megatron reads them
            return _prefixes(self, words)

    def tokenizer(self) -> str | None:
        """data.tokenizer: a Hugging Face tokenizer's path; Megatron's other tokenizers have no equivalent here."""
        a = self.a
        kind, path = a["tokenizer_type"], a["tokenizer_model"]
        if kind == "HuggingFaceTokenizer" and path:
            if not Path(path).exists():
                self.note(
                    f"data.tokenizer {path}: not found here; megatronlite reads a local tokenizer.json (or its dir)"
                )
            return path
        if kind is None:
            if path is not None:
                self.unmapped("tokenizer_model", "no --tokenizer-type given")
            return None
        why = "megatronlite reads a Hugging Face tokenizer.json (data.tokenizer) or uses its byte tokenizer"
        if kind == "GPT2BPETokenizer":
            why = (
                "GPT-2's vocab.json and merges.txt: save them as a tokenizer.json (transformers' GPT2TokenizerFast"
                "(vocab_file, merges_file).save_pretrained(DIR)) and set data.tokenizer: DIR"
            )
        self.unmapped("tokenizer_type", why)
        for dest in ("tokenizer_model", "vocab_file", "merge_file"):
            if a[dest] is not None:
                self.unmapped(dest, f"read with --tokenizer-type {kind}")
        return None

    def checkpoint(self) -> dict:
        a = self.a
        save, load = a["save"], a["load"]
        out: dict[str, Any] = {"save": bool(save), "interval": a["save_interval"] or 0, "keep": 0}
        if save:
            self.note(
                f"--save {save}: megatronlite saves under the run directory (train/launch --run-dir); Megatron "
                "keeps every checkpoint, so checkpoint.keep is 0"
            )
        if load is None:
            out["load"] = None
        elif load == save:
            out["load"] = "auto"  # resume from the run's own checkpoints, as Megatron does from --save
        else:
            self.unmapped(
                "load",
                "a Megatron checkpoint to start from: `megatronlite convert --from megatron --to "
                "mlite LOAD DST`, then checkpoint.load: DST",
            )
            out["load"] = None
        if a["async_save"]:
            out["async"] = True
        return out

    def logging(self) -> dict:
        a = self.a
        out: dict[str, Any] = {"interval": a["log_interval"]}
        if a["tensorboard_dir"]:
            out["tensorboard"] = True
            self.note(f"--tensorboard-dir {a['tensorboard_dir']}: megatronlite writes RUN_DIR/tensorboard")
        if a["wandb_project"]:
            wandb = {"mode": "online", "project": a["wandb_project"]}
            wandb.update({k: v for k, v in (("name", a["wandb_exp_name"]), ("entity", a["wandb_entity"])) if v})
            out["wandb"] = wandb
        else:
            for dest in ("wandb_exp_name", "wandb_entity"):
                if dest in self.given:
                    self.inert(dest, "no effect without --wandb-project")
        return out


def _prefixes(mapper: Mapper, paths: list[str]) -> list[dict]:
    if len(paths) > 1:
        mapper.approximated(
            "data_path",
            "Megatron blends unweighted prefixes by their sizes; each has weight 1 "
            "here: set the weights to the datasets' sizes",
        )
    return [{"path": p, "weight": 1.0} for p in paths]


def _features_beyond(arch: str, found: dict) -> dict:
    """The features `arch`'s preset does not already give: the model section names only those."""
    preset = ModelConfig(arch=arch)
    out = {k: v for k, v in found.items() if getattr(preset, k) != v}
    check = ModelConfig(arch=arch, **out)
    out.update({k: v for k, v in found.items() if getattr(check, k) != v})  # qkv_bias defaults to bias
    return out


def given_in_checkpoint(values: dict[str, Any]) -> dict[str, str]:
    """The args a checkpoint holds that differ from Megatron-LM's defaults, as flags. Left out: what Megatron derives
    (bookkeeping), groups inert in this run (MoE args without experts), and, where the default is not known
    here, values that mean unset (None, False, 0, empty)."""
    given = {}
    for dest, value in values.items():
        flag = lookup_dest(dest)
        default = flag.default if flag else None
        if dest in DERIVED or _same(value, default) or (default is None and _same(value, False, 0, "", [], ())):
            continue
        if flag and flag.when and not values.get(flag.when):  # a dense model's MoE args, ...: no effect at any value
            continue
        if flag is None:
            given[dest] = f"args.{dest}={_shown(value)}"
        elif flag.kind in ("true", "false") or value is True:
            given[dest] = f"--{flag.name}"
        else:
            given[dest] = f"--{flag.name} {_shown(value)}"
    return given


def _same(value: Any, *candidates: Any) -> bool:
    """`value` equals one of `candidates` (None always counts); a value that cannot compare (an array) does not."""
    for candidate in (None, *candidates):
        try:
            if type(value) is type(candidate) or {type(value), type(candidate)} <= {int, float, list, tuple}:
                if bool(value == candidate):
                    return True
        except (TypeError, ValueError):
            return False
    return False


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return f"<{type(value).__name__}>"
