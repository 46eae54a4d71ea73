"""`megatronlite preprocess`: formats, compression, worker-count independence, splitting and input errors."""

import argparse
import gzip
import json

import numpy as np
import pytest
import zstandard

from megatronlite.data import preprocess as pre
from megatronlite.data.indexed import IndexedDataset, paths
from megatronlite.errors import UserError

DOCS = [f"document {i}: " + "é∑ text " * (i % 7) for i in range(300)]


def jsonl(docs, key="text"):
    return "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs))


def read_all(prefix):
    ds = IndexedDataset(prefix)
    return [bytes(ds.get(i).astype(np.uint8)).decode() for i in range(ds.num_documents)]


def test_jsonl_txt_and_compressed_inputs_keep_order(tmp_path):
    (tmp_path / "a.jsonl").write_text(jsonl(DOCS[:10]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(jsonl(DOCS[10:20]))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS[20:30]).encode()))
    (tmp_path / "d.txt").write_text("one whole\n\nfile is one document\n")
    with gzip.open(tmp_path / "e.txt.gz", "wt") as f:
        f.write("gzipped text")
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt", "e.txt.gz")]
    [prefix] = pre.preprocess(inputs, str(tmp_path / "out"), progress=False)
    assert read_all(prefix) == DOCS[:30] + ["one whole\n\nfile is one document\n", "gzipped text"]


def test_globs_are_sorted_and_append_eod(tmp_path):
    for i in (2, 1):
        (tmp_path / f"part{i}.jsonl").write_text(jsonl([f"doc{i}"]))
    [prefix] = pre.preprocess([str(tmp_path / "part*.jsonl")], str(tmp_path / "out"), append_eod=True, progress=False)
    ds = IndexedDataset(prefix)
    assert [ds.get(i).tolist() for i in range(2)] == [list(b"doc1") + [256], list(b"doc2") + [256]]


def test_output_bytes_do_not_depend_on_workers(tmp_path):
    (tmp_path / "in.jsonl").write_text(jsonl(DOCS))
    outputs = []
    for workers in (1, 2):
        [prefix] = pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / f"w{workers}"), workers=workers,
                                  append_eod=True, progress=False)
        outputs.append([p.read_bytes() for p in paths(prefix)])
    assert outputs[0] == outputs[1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_split_into_round_robin(tmp_path):
    (tmp_path / "in.jsonl").write_text(jsonl(DOCS[:7]))
    prefixes = pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), split_into=3, progress=False)
    assert prefixes == [str(tmp_path / f"out_{i:05d}") for i in range(3)]
    assert [read_all(p) for p in prefixes] == [DOCS[0:7:3], DOCS[1:7:3], DOCS[2:7:3]]


def test_cli_main_and_progress(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(jsonl(DOCS[:3], key="body"))
    parser = argparse.ArgumentParser()
    pre.add_arguments(parser)
    args = parser.parse_args(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                              "--json-key", "body", "--append-eod", "--workers", "1"])
    pre.main(args)
    assert read_all(str(tmp_path / "o"))[0].startswith("document 0")
    assert "preprocess: 3 documents" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"in\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"in\.jsonl:3: no key 'text' \(found: body\)"),
        ('{"text": 5}\n', r"in\.jsonl:1: 'text' is int"),
        ("", r"0 documents"),
    ],
    ids=["bad-json", "missing-key", "not-a-string", "empty"],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), progress=False)
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(UserError, match=r"--input .*nope\.jsonl: file not found"):
        pre.preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"matches no files"):
        pre.preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "out"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"x\.csv: unknown input format"):
        pre.preprocess([str(tmp_path / "x.csv")], str(tmp_path / "out"))
