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
    # a batch's GEMMs have other shapes, so they round differently: ~1e-5 at these random weights' logits (~25)
    assert batch.shape == (2, 5, 257) and torch.allclose(batch[0], logits, atol=1e-4)
    assert torch.allclose(model(torch.tensor(ids)), logits, atol=1e-6)
    with pytest.raises(ValueError, match="token id 257 is outside the vocabulary 0..256"):
        model([1, 257])
    assert model.train()([ids]).requires_grad  # training mode: an ordinary module again
    model.eval()

    greedy = generate_ids(model, list(b"Hi"), 6, stop_id=256)
    assert megatronlite.generate(model, list(b"Hi"), max_new_tokens=6) == greedy
    assert megatronlite.generate(model, "Hi", max_new_tokens=6) == ByteTokenizer().decode(greedy)


def test_load_model_routes_by_the_trained_selection_biases(tmp_path, corpus):
    """A run with aux-loss-free balancing saves its routers' biases as state beside the weights; the loaded model
    routes by them (its logits change without them)."""
    from helpers import tiny_overrides, train

    from megatronlite.checkpoint import store

    moe = {"num_experts": 4, "top_k": 1, "router": "sigmoid", "bias_update_rate": 0.05, "ffn_hidden_size": 32}
    sets = {f"model.moe.{k}": v for k, v in moe.items()} | {"train.steps": 3, "checkpoint.interval": 3}
    run = tmp_path / "run"
    train(run, tiny_overrides(corpus, run, **sets))
    model = load_model(run)
    step_dir = store.find_step_dir(run)
    stored = {}
    store.read_shards(step_dir, {}, [p for p in _bias_pieces(model, stored)])
    for i, bias in stored.items():
        assert bias.abs().sum() > 0 and torch.equal(model.layers[str(i)].mlp.bias, bias), i
    ids = list(range(40, 56))
    routed = model(ids)
    for layer in model.layers.values():
        layer.mlp.bias.zero_()
    assert not torch.allclose(model(ids), routed)


def _bias_pieces(model, into: dict) -> list:
    from megatronlite.checkpoint.views import GlobalPiece

    out = []
    for i, block in model.layers.items():
        into[int(i)] = torch.empty_like(block.mlp.bias)
        out.append(GlobalPiece(f"state.layers.{i}.mlp.bias", into[int(i)], tuple(block.mlp.bias.shape), (0,)))
    return out
