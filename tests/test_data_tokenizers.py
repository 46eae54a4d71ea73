"""Tokenizers: the byte tokenizer, and a BPE trained by `megatronlite tokenizer train`, loaded by path."""

import argparse
import json
import subprocess
import sys

import pytest
from helpers import read_metrics, set_args, tiny_overrides

from megatronlite.data import tokenizer_train
from megatronlite.data.tokenizers import build_tokenizer
from megatronlite.errors import UserError

CLI = [sys.executable, "-m", "megatronlite"]
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


@pytest.mark.slow
def test_preprocess_with_a_tokenizer_json_then_train(tmp_path, trained):
    """The whole path with a trained tokenizer: `preprocess --tokenizer PATH --json-key` on .jsonl and
    .txt writes its ids (read back by megatron-core), and `train` runs on them with that tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [f"{TEXT} document {i}" for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "more.txt").write_text("a text file is one document")
    inputs = [str(tmp_path / "in.jsonl"), str(tmp_path / "more.txt")]
    prefix = tmp_path / "bpe"
    prep = ["preprocess", "--input", *inputs, "--output-prefix", str(prefix), "--json-key", "body", "--append-eod"]
    subprocess.run([*CLI, *prep, "--tokenizer", str(trained / "tokenizer.json")], check=True, timeout=120)
    tok = build_tokenizer(str(trained / "tokenizer.json"))
    theirs = IndexedDataset(str(prefix))
    expected = [tok.encode(d) + [tok.eod_id] for d in [*docs, "a text file is one document"]]
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    run = tmp_path / "run"
    sets = {"model.vocab_size": 400, "data.tokenizer": str(trained), "train.steps": 2, "train.seq_len": 16}
    args = ["train", "configs/demo.yaml", "--run-dir", str(run)]
    args += set_args(tiny_overrides(str(prefix), run, **sets))
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
