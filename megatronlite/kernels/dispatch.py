"""Which implementation runs each op, and the ops themselves as the model and trainer call them.

Each op has its own choice, `auto | torch | triton | apex | te`; not every backend has every op
(BACKENDS lists them). `auto` is triton on CUDA when triton is installed, else torch; on CPU it is
always torch. apex and te are used only when named. A backend that is chosen but cannot run (not
installed, wrong device, no such op) raises UserError naming the op, the choice and the way out;
`resolve_all` checks a run's whole choice before training starts and `summary` prints it in one
line. Implementations load on first use, so importing this module never imports triton, apex or
Transformer Engine.

Triton on CPU: on a machine without CUDA, triton_runtime switches on Triton's interpreter, so
`impl="triton"` runs the real kernels on CPU tensors (slowly). That is how the tests check them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from megatronlite.errors import UserError
from megatronlite.extras import install_hint
from megatronlite.kernels import external
from megatronlite.kernels.fused_adamw import FusedAdamW
from megatronlite.kernels.linear_cross_entropy import linear_cross_entropy as _chunked_cross_entropy
from megatronlite.version import installed

IMPLS = ("auto", "torch", "triton", "apex", "te")

# op -> backend -> "module:attribute" in megatronlite.kernels, imported on first use
_IMPLEMENTATIONS = {
    "rms_norm": {
        "torch": "torch_fused:rms_norm",
        "triton": "triton_norm:rms_norm",
        "apex": "external:apex_rms_norm",
        "te": "external:te_rms_norm",
    },
    "layer_norm": {
        "torch": "reference:layer_norm",
        "triton": "triton_norm:layer_norm",
        "apex": "external:apex_layer_norm",
        "te": "external:te_layer_norm",
    },
    "rotary": {"torch": "reference:apply_rotary", "triton": "triton_rope:apply_rotary"},
    "swiglu": {"torch": "reference:swiglu", "triton": "triton_swiglu:swiglu"},
    "linear_cross_entropy": {"torch": "reference:CE_CHUNK_OPS", "triton": "triton_cross_entropy:CE_CHUNK_OPS"},
    "adamw": {"torch": "reference:adamw_step", "triton": "triton_adamw:adamw_step", "apex": "external:apex_adamw"},
}
OPS = tuple(_IMPLEMENTATIONS)
BACKENDS = {op: tuple(impls) for op, impls in _IMPLEMENTATIONS.items()}
_NAMES = {"apex": "NVIDIA apex", "te": "Transformer Engine"}


INTERPRETER_TRITON = (3, 9)  # the oldest triton whose interpreter runs these kernels (3.6 does not; compiled they do)


def _triton_version() -> str:
    """The installed triton's version, read without importing it (importing this module imports no triton)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # another distribution of it (pytorch-triton): not judged
        return "999"


def _release(version: str) -> tuple[int, ...]:
    """(3, 6, 0) of '3.6.0+git1234': the leading numbers."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def triton_problem(device: str | torch.device = "cpu") -> str | None:
    """Why triton kernels cannot run on `device` here, or None when they can."""
    device_type = torch.device(device).type
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed ({install_hint('triton')})"
    interpreter = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    version = _triton_version() if device_type == "cpu" and interpreter else None
    if version is not None and _release(version) < INTERPRETER_TRITON:
        return (
            f"triton {version}'s CPU interpreter cannot run these kernels (loops bounded by a runtime "
            f"value): it needs triton >= {'.'.join(map(str, INTERPRETER_TRITON))}"
        )
    if device_type == "cuda" or (device_type == "cpu" and interpreter):
        return None
    return f"triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device_type}"


def _problem(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run on `device_type`, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_problem(device_type)
    if not external.available(backend):
        return (
            f"{_NAMES[backend]} is not installed (it comes with NVIDIA's PyTorch container; "
            "PyPI's `apex` is a different package)"
        )
    if device_type != "cuda":
        return f"{_NAMES[backend]} needs CUDA tensors, not {device_type}"
    return None


@functools.cache
def resolve(op: str, impl: str = "auto", device: str | torch.device = "cpu") -> str:
    """The backend that runs `op` for the choice `impl` on `device`; UserError when it cannot run."""
    device_type = torch.device(device).type
    if op not in _IMPLEMENTATIONS:
        raise UserError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")
    if impl not in IMPLS:
        raise UserError(f"kernel {op}={impl!r}: unknown implementation; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device_type == "cuda" and triton_problem("cuda") is None else "torch"
    valid = ", ".join(("auto",) + BACKENDS[op])
    if impl not in _IMPLEMENTATIONS[op]:
        raise UserError(f"kernel {op}={impl!r}: {impl} has no {op} here; valid: {valid}")
    problem = _problem(impl, device_type)
    if problem:
        raise UserError(f"kernel {op}={impl!r}: {problem}; choose auto or torch")
    return impl


def resolve_all(choices: str | Mapping[str, str] = "auto", device: str | torch.device = "cpu") -> dict[str, str]:
    """Resolve every op at once (one choice for all, or per op with `auto` for the rest): call at start-up."""
    if isinstance(choices, str):
        choices = dict.fromkeys(OPS, choices)
    unknown = sorted(set(choices) - set(OPS))
    if unknown:
        raise UserError(f"unknown kernel op(s) {', '.join(unknown)}; ops: {', '.join(OPS)}")
    return {op: resolve(op, choices.get(op, "auto"), device) for op in OPS}


def summary(choices: str | Mapping[str, str] = "auto", device: str | torch.device = "cpu") -> str:
    """One line for the start-up log, e.g. `kernels on cuda: rms_norm=triton ... adamw=triton (triton 3.9.0)`."""
    resolved = resolve_all(choices, device)
    line = f"kernels on {torch.device(device).type}: " + " ".join(f"{op}={b}" for op, b in resolved.items())
    if "triton" in resolved.values():
        interpreted = torch.device(device).type == "cpu"
        line += f" (triton {installed('triton')}{', interpreter' if interpreted else ''})"
    return line


_LOADED: dict[tuple[str, str, str], Any] = {}  # a plain dict, not functools.cache: torch.compile traces it cleanly


def implementation(op: str, impl: str = "auto", device: str | torch.device = "cpu") -> Any:
    """The function (or chunk-op table) that runs `op`, imported on first use."""
    key = (op, impl, torch.device(device).type)
    if key not in _LOADED:
        _LOADED[key] = backend_function(op, resolve(*key))
    return _LOADED[key]


def backend_function(op: str, backend: str) -> Any:
    """The function of an already-resolved backend (what a model binds once, so compiled code sees no lookups)."""
    module, attr = _IMPLEMENTATIONS[op][backend].split(":")
    return getattr(importlib.import_module(f"megatronlite.kernels.{module}"), attr)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """weight * normalize(x) over the last dim, statistics in fp32 (models/gpt.py Norm, llama)."""
    return implementation("rms_norm", impl, x.device)(x, weight, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, impl: str = "auto"
) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, returned in x's dtype (models/gpt.py Norm, gpt2)."""
    return implementation("layer_norm", impl, x.device)(x, weight, bias, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Half-rotation RoPE on x [batch, heads, seq, head_dim] with cos, sin [seq, head_dim]."""
    return implementation("rotary", impl, x.device)(x, cos, sin)


def swiglu(fused: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up from the fused [..., 2f] projection whose last dim is [gate; up]."""
    return implementation("swiglu", impl, fused.device)(fused)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    tp_group: dist.ProcessGroup | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden [..., h] @ weight.T` against `target [...]`, never building all logits.

    `weight` is this rank's vocabulary shard [V_padded / TP, h] (rank r holds rows r*V_local...);
    columns at or past `vocab_size` are padding and masked out. `tp_group` None means TP = 1. `hidden`
    must already be the column-parallel input (after copy_to_tp / gather_tokens): its gradient is
    this rank's partial sum, which that mapping reduces, exactly as for F.linear. `chunk_size` tokens
    per chunk; None picks it so a chunk's fp32 logits stay within a fixed budget (linear_cross_entropy.CHUNK_BYTES).
    """
    ops = implementation("linear_cross_entropy", impl, hidden.device)
    return _chunked_cross_entropy(hidden, weight, target, vocab_size, tp_group, chunk_size, ops)


def fused_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    impl: str = "auto",
) -> torch.optim.Optimizer:
    """AdamW for `params` (tensors or torch param groups): FusedAdamW with the chosen update, or apex's FusedAdam."""
    params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    step_fn = implementation("adamw", impl, first.device)
    if resolve("adamw", impl, first.device) == "apex":  # step_fn is then apex's optimizer factory
        return step_fn(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return FusedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step_fn=step_fn)
