"""Document masking of packed samples (data.document_mask, data.eod_mask_loss), in one process.

Across layouts (tp2, pp2, cp2, SP, bf16) the same features train equal to one process in
tests/test_parallel_equivalence.py (the `features` model)."""

import pytest
import torch

from megatronlite.config import ModelConfig
from megatronlite.data.documents import document_ids, document_positions
from megatronlite.models.gpt import GPTModel, Packing, RunOptions
from megatronlite.models.init import init_parameters

EOD = 7
DOCS = [[1, 2, 3, EOD], [4, 5, 6, 8, 9, EOD], [10, 11, 12, 13, 14, 15, 16]]  # the last one cut by the sample's end


def packed() -> torch.Tensor:
    return torch.tensor([sum(DOCS, [])])


def test_documents_and_positions_restart_after_each_end_of_document():
    documents = document_ids(packed(), EOD)
    assert documents.tolist() == [[0] * 4 + [1] * 6 + [2] * 7]
    assert document_positions(documents).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]]
    starts_with_eod = torch.tensor([[EOD, 1, 2, EOD, EOD, 3]])
    assert document_ids(starts_with_eod, EOD).tolist() == [[0, 1, 1, 1, 2, 3]]
    assert document_positions(document_ids(starts_with_eod, EOD)).tolist() == [[0, 0, 1, 2, 0, 0]]


def model(arch: str, **features) -> GPTModel:
    kv = 4 if arch == "gpt2" else 2
    cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=kv, vocab_size=50, **features)
    m = GPTModel(cfg, options=RunOptions(masked_loss=True))
    init_parameters(m, cfg, seed=3)
    return m.eval()


@pytest.mark.parametrize(
    "arch, features",
    [("llama", {}), ("gpt2", {}), ("qwen3", {"head_dim": 12, "sliding_window": 3}), ("qwen2", {"bias": True})],
)
def test_packed_logits_equal_each_document_alone(arch, features):
    m = model(arch, **features)
    tokens = packed()
    documents = document_ids(tokens, EOD)
    with torch.no_grad():
        together = m(tokens, packing=Packing(documents, document_positions(documents)))
        alone = torch.cat([m(torch.tensor([doc])) for doc in DOCS], dim=1)
        unmasked = m(tokens)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert (unmasked[:, 4:] - alone[:, 4:]).abs().max() > 1e-3  # without the mask the documents do see each other


def test_eod_mask_loss_leaves_out_predictions_from_end_of_document():
    m = model("llama")
    tokens = torch.tensor([sum(DOCS, []) + [17]])
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    masked = labels.masked_fill(inputs == EOD, -1)
    with torch.no_grad():
        loss = m(inputs, masked)
        logits = m(inputs)
    per_token = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    keep = inputs[0] != EOD
    assert keep.sum() == inputs.shape[1] - 2
    torch.testing.assert_close(loss, per_token[keep].mean())
    assert not torch.isclose(loss, per_token.mean())
