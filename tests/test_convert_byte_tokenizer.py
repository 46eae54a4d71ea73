"""A byte-tokenizer model exported to HF carries a tokenizer transformers loads, with the byte tokenizer's ids."""

import pytest
import torch

from megatronlite import config
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint
from megatronlite.convert import Options, convert
from megatronlite.data.tokenizers import ByteTokenizer, build_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["def main():\n    return 0\n", "  two  spaces\n\ttab", "héllo wörld — 日本語 🙂", ""]


def test_hf_export_of_a_byte_model_has_a_tokenizer_transformers_loads(tmp_path):
    sets = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64"]
    cfg = config.load("configs/demo.yaml", sets)
    assert cfg.data.tokenizer == "byte"
    write_checkpoint(tmp_path / "run", cfg, ((n, torch.zeros(s)) for n, s in expected_shapes(cfg).items()))
    convert("mlite", "hf", tmp_path / "run", tmp_path / "hf", Options())

    ours, theirs = ByteTokenizer(), transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (theirs.eos_token_id, len(theirs)) == (ours.eod_id, ours.vocab_size)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id == ours.eod_id  # generate stops
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == ours.decode(ids) == text
    broken = [0xE6, 0x97, ord("h"), 0xFF]  # a cut multi-byte character and an invalid byte: replaced alike
    assert theirs.decode(broken) == ours.decode(broken)
    assert theirs.decode([*b"hi", ours.eod_id], skip_special_tokens=True) == "hi"

    convert("hf", "mlite", tmp_path / "hf", tmp_path / "back", Options())  # and megatronlite reads it back
    back = build_tokenizer(config.load(tmp_path / "back" / "config.yaml").data.tokenizer)
    assert back.eod_id == ours.eod_id and all(back.encode(t) == ours.encode(t) for t in TEXTS)
