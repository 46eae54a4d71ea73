"""The documents of packed samples: which document each token is in, its position in it, the loss mask.

A training sample is `seq_len` tokens cut from a stream of documents joined by end-of-document
(EOD) tokens, so one sample holds pieces of several. As Megatron's `--reset-attention-mask
--reset-position-ids`, an EOD token belongs to the document it ends and the next token starts a
new one at position 0; `--eod-mask-loss` drops the loss where the input token is EOD (the
prediction of the next document's first token from the previous one).
"""

from __future__ import annotations

import torch


def document_ids(inputs: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] integer ids of each token's document within its sample, counting from 0."""
    ends = (inputs == eod_id).long()
    return ends.cumsum(dim=1) - ends  # the EODs strictly before each token


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[b, s] each token's position within its document (0 at every document's first token)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # latest start so far
    return index - first


def loss_mask(inputs: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] 1.0 where the loss counts, 0.0 where the input token is EOD."""
    return (inputs != eod_id).float()
