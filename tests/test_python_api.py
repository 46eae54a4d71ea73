"""The Python API a user meets first: `load_model` takes token ids as they come, `generate` continues text."""

import pytest
import torch

import megatronlite
from megatronlite import config, load_model
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint
from megatronlite.data.tokenizers import ByteTokenizer
from megatronlite.train.generate import generate_ids

TINY = {
    "model.num_layers": 2,
    "model.hidden_size": 32,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.ffn_hidden_size": 64,
    "model.max_seq_len": 16,
    "model.make_vocab_size_divisible_by": 128,  # the GPU default: 257 rows padded to 384 inside a layout
    "train.seq_len": 16,
}


def random_checkpoint(run, arch: str):
    cfg = config.load("configs/demo.yaml", [f"{k}={v}" for k, v in {**TINY, "model.arch": arch}.items()])
    gen = torch.Generator().manual_seed(0)
    write_checkpoint(run, cfg, ((n, torch.randn(s, generator=gen)) for n, s in expected_shapes(cfg).items()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_model_takes_lists_hides_padding_and_generates(tmp_path, arch):
    random_checkpoint(tmp_path / "run", arch)
    model = load_model(tmp_path / "run")
    rows = {name: t.shape[0] for name, t in model.state_dict().items() if name.startswith(("embedding.word", "output"))}
    assert rows and set(rows.values()) == {257}, rows  # the real vocabulary, as the checkpoint holds it

    ids = [72, 105, 33, 256, 10]
    logits = model(ids)  # a list: one sequence, logits [seq, vocab] without an autograd graph
    assert logits.shape == (5, 257) and not logits.requires_grad
    batch = model(torch.tensor([ids, ids[::-1]], dtype=torch.int32))
    assert batch.shape == (2, 5, 257) and torch.allclose(batch[0], logits, atol=1e-6)
    assert torch.allclose(model(torch.tensor(ids)), logits, atol=1e-6)
    with pytest.raises(ValueError, match="token id 257 is outside the vocabulary 0..256"):
        model([1, 257])
    assert model.train()([ids]).requires_grad  # training mode: an ordinary module again
    model.eval()

    greedy = generate_ids(model, list(b"Hi"), 6, stop_id=256)
    assert megatronlite.generate(model, list(b"Hi"), max_new_tokens=6) == greedy
    assert megatronlite.generate(model, "Hi", max_new_tokens=6) == ByteTokenizer().decode(greedy)
