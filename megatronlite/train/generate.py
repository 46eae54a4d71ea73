"""Sampling text from a model: greedy at temperature 0, else temperature and top-k sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatronlite.data.tokenizers import Tokenizer, build_tokenizer
from megatronlite.errors import UserError
from megatronlite.models.gpt import GPTModel


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Refuse settings the sampler would crash on (a NaN temperature) or silently misread (negative ones)."""
    if max_new_tokens < 1:
        raise UserError(f"generate: --max-new-tokens = {max_new_tokens}; valid: an integer >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"generate: --temperature = {temperature}; valid: a finite number >= 0 (0: greedy)")
    if top_k < 0:
        raise UserError(f"generate: --top-k = {top_k}; valid: an integer >= 0 (0: sample from all tokens)")


@torch.no_grad()
def generate_ids(
    model: GPTModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Continue `prompt_ids`; the context is cut to the model's max_seq_len (no KV cache: models here are small)."""
    check_sampling(max_new_tokens, temperature, top_k)
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.cfg.max_seq_len :]], device=device)
        logits = model(context)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt == stop_id:
            break
        ids.append(nxt)
    return ids[len(prompt_ids) :]


def generate(
    model: GPTModel,
    prompt: str | Sequence[int],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> str | list[int]:
    """The continuation of `prompt` (not the prompt again): text for a text prompt, token ids for ids.

    Tokens are the run's (`model.run_config.data.tokenizer`, as `load_model` sets it) unless `tokenizer`
    is given; generation stops early at its end-of-document token. What `megatronlite generate` runs.
    """
    if tokenizer is None:
        run_config = getattr(model, "run_config", None)
        if run_config is None:
            raise UserError("generate: the model has no run_config (it is not from load_model); pass tokenizer=")
        tokenizer = build_tokenizer(run_config.data.tokenizer)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise UserError("generate: the prompt is empty; give at least one token")
    outside = next((i for i in ids if not 0 <= i < model.cfg.vocab_size), None) if isinstance(prompt, str) else None
    if outside is not None:  # a text prompt's token the model has no row for (ids are checked by generate_ids)
        raise UserError(
            f"generate: the prompt's {tokenizer.decode([outside])!r} is token {outside}; the model's vocabulary has "
            f"{model.cfg.vocab_size} tokens (a model trained with another tokenizer?)"
        )
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, stop_id=tokenizer.eod_id)
    return tokenizer.decode(new) if isinstance(prompt, str) else new
