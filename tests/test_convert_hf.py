"""HF Llama / GPT-2 <-> megatronlite, checked against transformers itself (random models, no downloads)."""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from megatronlite import load_model  # noqa: E402
from megatronlite.convert import Options, convert  # noqa: E402
from megatronlite.train.generate import generate_ids  # noqa: E402

VOCAB = 101
SHAPES = {
    # name: (architecture, config kwargs)
    "llama-mha-untied": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa3-untied": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)),
    "llama-mqa-odd-heads": ("llama", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1)),
    "llama-gqa-tied": (
        "llama",
        dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=5e5),
    ),
    "gpt2-tied-odd-heads": ("gpt2", dict(n_embd=48, n_head=3)),
    "gpt2-untied": ("gpt2", dict(n_embd=40, n_head=5, n_inner=72, tie_word_embeddings=False)),
}


def hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers model of one of SHAPES."""
    arch, kwargs = SHAPES[kind]
    kwargs = {**kwargs, **overrides}
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            intermediate_size=80,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            **kwargs,
        )
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.GPT2Config(
            n_layer=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0, **kwargs
        )
        cls = transformers.GPT2LMHeadModel
    return random_model(cls, cfg, seed)


def random_model(cls, cfg, seed: int = 0):
    """A transformers model of `cls` whose every weight (norms and biases too) is random, so no mapping hides."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def save_hf(model, path, dtype=torch.float32):
    model.to(dtype).save_pretrained(path)
    model.float()
    return path


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def tensors(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_hf_to_mlite_matches_transformers(tmp_path, kind):
    """Logits within 1e-4 of transformers and the same 20 greedy tokens: GQA grouping, gate/up, GPT-2's
    transposes and fused c_attn, tied heads, and the rotary convention (no permutation) are all right."""
    hf = hf_model(kind)
    convert("hf", "mlite", save_hf(hf, tmp_path / "hf"), tmp_path / "ml", Options())
    ours = load_model(tmp_path / "ml")
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[0, :6].tolist()
    assert generate_ids(ours, prompt, 20) == hf_greedy(hf, prompt, 20)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_round_trip_is_bit_exact_and_loads_cleanly(tmp_path, kind):
    src = save_hf(hf_model(kind), tmp_path / "hf")
    convert("hf", "mlite", src, tmp_path / "ml", Options())
    convert("mlite", "hf", tmp_path / "ml", tmp_path / "back", Options())
    cls = getattr(transformers, json.loads((src / "config.json").read_text())["architectures"][0])
    _, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    before, after = tensors(src), tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rope_convention_is_proven_not_assumed(tmp_path):
    """Our rotary embedding pairs dims (i, i + d/2) of each head, as HF does, so q/k rows are copied as they
    are. The comparison is sensitive to this: re-ordering our q/k rows into interleaved pairs (what a converter
    from Meta's original layout does) breaks the match with transformers."""
    hf = hf_model("llama-gqa3-untied")
    convert("hf", "mlite", save_hf(hf, tmp_path / "hf"), tmp_path / "ml", Options())
    ours = load_model(tmp_path / "ml")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    kv, per_group, d, h = 2, 3, 8, 48
    with torch.no_grad():
        reference = hf(ids).logits
        assert (ours(ids) - reference).abs().max().item() < 1e-4
        for layer in ours.layers.values():
            grouped = layer.attention.qkv.weight.view(kv, per_group + 2, d, h)
            q_and_k = grouped[:, : per_group + 1]
            q_and_k.copy_(q_and_k.reshape(kv, per_group + 1, 2, d // 2, h).transpose(2, 3).reshape(q_and_k.shape))
        assert (ours(ids) - reference).abs().max().item() > 1e-2


def test_sharded_output_and_bf16_round_trip(tmp_path):
    src = save_hf(hf_model("llama-gqa-tied"), tmp_path / "hf", dtype=torch.bfloat16)
    convert("hf", "mlite", src, tmp_path / "ml", Options())
    convert("mlite", "hf", tmp_path / "ml", tmp_path / "back", Options(dtype=torch.bfloat16, max_shard_bytes=20_000))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    before, after = tensors(src), tensors(tmp_path / "back")
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)
    assert before.keys() == after.keys()
    convert("hf", "mlite", tmp_path / "back", tmp_path / "ml2", Options())  # reads the index and its shards
    _, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tokenizer_files_travel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = save_hf(hf_model("gpt2-tied-odd-heads"), tmp_path / "hf")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "hello", "world", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text("{}")
    convert("hf", "mlite", src, tmp_path / "ml", Options())
    model = load_model(tmp_path / "ml")
    assert model.run_config.data.tokenizer == str((tmp_path / "ml" / "tokenizer").resolve())
    convert("mlite", "hf", tmp_path / "ml", tmp_path / "back", Options())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()


def test_gpt2_checkpoint_without_base_prefix(tmp_path):
    """The original gpt2 files name tensors `h.0...` (saved from GPT2Model): read as transformers does."""
    from safetensors.torch import save_file

    hf = hf_model("gpt2-tied-odd-heads")
    src = save_hf(hf, tmp_path / "hf")
    bare = {k.removeprefix("transformer."): v for k, v in tensors(src).items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the causal-mask buffer old files carry
    save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert("hf", "mlite", src, tmp_path / "ml", Options())
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load_model(tmp_path / "ml")(ids) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama-mha-untied", "gpt2-untied"])
def test_a_tied_config_beside_a_trained_head_is_read_as_transformers_reads_it(tmp_path, kind):
    """A config that ties the head (`tie_word_embeddings: true`, or GPT-2's default when the key is absent) beside
    files holding a head of their own: transformers keeps that head, and so does the conversion, with a note."""
    path = save_hf(hf_model(kind), tmp_path / "hf")
    raw = json.loads((path / "config.json").read_text())
    if kind.startswith("gpt2"):
        del raw["tie_word_embeddings"]
    else:
        raw["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(raw))
    reference = getattr(transformers, raw["architectures"][0]).from_pretrained(path).eval()
    assert reference.lm_head.weight.data_ptr() != reference.get_input_embeddings().weight.data_ptr()
    ckpt = convert("hf", "mlite", path, tmp_path / "ml", Options())
    assert any("read untied, as transformers reads it" in note for note in ckpt.notes), ckpt.notes
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load_model(tmp_path / "ml")(ids) - reference(ids).logits).abs().max().item() < 1e-4
