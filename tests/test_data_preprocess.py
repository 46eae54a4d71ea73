"""`megatronlite preprocess`: formats, compression, worker-count independence, splitting and input errors."""

import argparse
import gzip
import json

import numpy as np
import pytest
import zstandard
from helpers import error_of

from megatronlite.data import preprocess as pre
from megatronlite.data import readers
from megatronlite.data.indexed import IndexedDataset, paths
from megatronlite.errors import UserError

DOCS = [f"document {i}: " + "é∑ text " * (i % 7) for i in range(300)]


def jsonl(docs, key="text"):
    return "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs))


def write_compressed(path, text):
    """`text` into PATH, compressed as its suffix (.gz, .zst) says, or plain."""
    data = text.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


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


def test_output_bytes_do_not_depend_on_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 500)  # many chunks per file, planned in this process
    inputs = [
        write_compressed(tmp_path / "a.jsonl", jsonl(DOCS[:150])),
        str(tmp_path / "b.txt"),
        write_compressed(tmp_path / "c.jsonl.zst", jsonl(DOCS[150:])),
    ]
    (tmp_path / "b.txt").write_text("a text file\r\nis one document")
    outputs = []
    for workers in (1, 2):
        prefixes = pre.preprocess(
            inputs, str(tmp_path / f"w{workers}"), workers=workers, split_into=3, append_eod=True, progress=False
        )
        outputs.append([p.read_bytes() for prefix in prefixes for p in paths(prefix)])
    assert outputs[0] == outputs[1]
    [prefix] = pre.preprocess(inputs, str(tmp_path / "one"), append_eod=True, progress=False)
    whole, second = IndexedDataset(prefix), IndexedDataset(f"{tmp_path}/w2_00001")
    assert whole.num_documents == 301 and second.num_documents == 100
    assert all(np.array_equal(second.get(k), whole.get(3 * k + 1)) for k in range(100))
    assert bytes(whole.get(150)[:-1].astype(np.uint8)) == b"a text file\r\nis one document"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_same_bytes_as_megatron_core_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    (tmp_path / "in.jsonl").write_text(jsonl(DOCS))
    [ours] = pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "ours"), append_eod=True, progress=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in DOCS:
        ids = list(doc.encode()) + [256]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert [p.read_bytes() for p in paths(ours)] == [p.read_bytes() for p in paths(tmp_path / "theirs")]


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz", "in.jsonl.zst"])
def test_chunks_keep_every_document_and_the_line_numbers(tmp_path, monkeypatch, name):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 100)
    path = write_compressed(tmp_path / name, jsonl(DOCS) + "\n" + '{"text": 1}\n')
    assert len(list(readers.plan_chunks([tmp_path / name]))) > 10
    with pytest.raises(UserError, match=rf"{name}:302: 'text' is int"):
        list(readers.iter_documents([path]))
    special = "a JSON line ends only at \\n, not at \u2028 or \x85"
    write_compressed(tmp_path / name, jsonl(DOCS[:200]) + json.dumps({"text": special}, ensure_ascii=False) + "\r\n")
    assert list(readers.iter_documents([path])) == DOCS[:200] + [special]


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, monkeypatch, name):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 100)
    data = (jsonl(DOCS[:50]) + '{"text": "x"}\n').encode().replace(b'"x"', b'"\xff"')
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(UserError, match=rf"{name}:51: not UTF-8 text"):
        pre.preprocess([str(tmp_path / name)], str(tmp_path / "out"), progress=False)


def test_corrupt_compressed_input(tmp_path):
    (tmp_path / "in.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "t.txt.zst").write_bytes(b"not zstd either")
    for name in ("in.jsonl.gz", "t.txt.zst"):
        with pytest.raises(UserError, match=rf"{name}: unreadable"):
            pre.preprocess([str(tmp_path / name)], str(tmp_path / "out"), progress=False)


def test_split_into_round_robin(tmp_path):
    (tmp_path / "in.jsonl").write_text(jsonl(DOCS[:7]))
    prefixes = pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), split_into=3, progress=False)
    assert prefixes == [str(tmp_path / f"out_{i:05d}") for i in range(3)]
    assert [read_all(p) for p in prefixes] == [DOCS[0:7:3], DOCS[1:7:3], DOCS[2:7:3]]


def test_cli_main_and_progress(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(jsonl(DOCS[:3], key="body"))
    parser = argparse.ArgumentParser()
    pre.add_arguments(parser)
    args = parser.parse_args(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--json-key",
            "body",
            "--append-eod",
            "--workers",
            "1",
        ]
    )
    pre.main(args)
    assert read_all(str(tmp_path / "o"))[0].startswith("document 0")
    assert "preprocess: 3 documents" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message, workers",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"in\.jsonl:2: not valid JSON", 1),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"in\.jsonl:3: no key 'text' \(found: body\)", 1),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"in\.jsonl:3: no key 'text' \(found: body\)", 2),
        ('{"text": 5}\n', r"in\.jsonl:1: 'text' is int", 1),
        ("", r"0 documents", 1),
    ],
    ids=["bad-json", "missing-key", "missing-key-in-a-worker", "not-a-string", "empty"],
)
def test_bad_input_names_file_and_line(tmp_path, content, message, workers):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        pre.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), workers=workers, progress=False)
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_an_output_prefix_under_a_file_is_named(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n')
    (tmp_path / "afile").write_text("x")
    line = error_of(
        capsys, "preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "afile" / "pp")
    )
    assert f"--output-prefix {tmp_path / 'afile'}: cannot make the directory" in line


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(UserError, match=r"--input .*nope\.jsonl: file not found"):
        pre.preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"matches no files"):
        pre.preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "out"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"x\.csv: unknown input format"):
        pre.preprocess([str(tmp_path / "x.csv")], str(tmp_path / "out"))


def test_an_empty_text_is_no_document_as_in_megatron():
    """Megatron-LM's preprocess_data.py adds no sequence (and no lone EOD) for a text of no tokens: the same
    sequences, so the same splits and sample order, from the same jsonl."""
    from megatronlite.data.preprocess import encode_documents
    from megatronlite.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("byte")
    tokens, sizes = encode_documents(tokenizer, ["ab", "", "cd"], True, np.dtype(np.uint16))
    assert sizes.tolist() == [3, 3]
    assert tokens.tolist() == [*tokenizer.encode("ab"), tokenizer.eod_id, *tokenizer.encode("cd"), tokenizer.eod_id]
