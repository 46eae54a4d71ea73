"""Tokenizers: the byte tokenizer, and a BPE trained by `megatronlite tokenizer train`, loaded by path."""

import argparse
import json

import pytest

from megatronlite.data import tokenizer_train
from megatronlite.data.tokenizers import build_tokenizer
from megatronlite.errors import UserError

TEXT = "Grüße, 世界! def f(x):\n    return x ** 2  # ✓"


def test_byte_round_trip_non_ascii():
    tok = build_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(ids + [tok.eod_id]) == TEXT
    assert (tok.vocab_size, tok.eod_id, tok.name) == (257, 256, "byte")
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character decodes, replaced


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.jsonl"
    lines = [json.dumps({"text": f"{TEXT} line {i} the quick brown fox"}) for i in range(200)]
    corpus.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    tokenizer_train.add_arguments(parser)
    args = ["--input", str(corpus), "--vocab-size", "400", "--output", str(root / "t")]
    tokenizer_train.main(parser.parse_args(args))
    return root / "t"


def test_trained_bpe_round_trips(trained):
    for spec in (str(trained), str(trained / "tokenizer.json")):
        tok = build_tokenizer(spec)
        assert tok.vocab_size == 400
        ids = tok.encode(TEXT)
        assert len(ids) < len(TEXT.encode())  # merges were learned
        assert tok.decode(ids) == TEXT
        assert tok.eod_id == tok.encode("<|endoftext|>")[0]
        assert tok.name.startswith("hf:") and tok.name == build_tokenizer(spec).name


def test_tokenizer_errors(tmp_path, trained):
    with pytest.raises(UserError, match="nope.*not found"):
        build_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="bad.json: not a readable tokenizer.json"):
        build_tokenizer(str(tmp_path / "bad.json"))
    data = json.loads((trained / "tokenizer.json").read_text())
    data["added_tokens"] = []
    del data["model"]["vocab"]["<|endoftext|>"]
    (tmp_path / "noeod.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="noeod.json: no end-of-document token"):
        build_tokenizer(str(tmp_path / "noeod.json"))


def test_train_rejects_tiny_vocab(tmp_path):
    with pytest.raises(UserError, match="--vocab-size 100"):
        tokenizer_train.train_tokenizer([str(tmp_path / "x.txt")], 100, str(tmp_path / "t"))
