"""Sampling text from a model: greedy at temperature 0, else temperature and top-k sampling."""

from __future__ import annotations

import torch

from megatronlite.models.gpt import GPTModel


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
