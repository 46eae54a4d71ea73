"""Files from others never run code: malicious DCP `.metadata` for every command that reads one, a fuzzed
unpickler, and checkpoints whose metadata points outside or past their files."""

import os
import pickle
import shutil
from unittest import mock

import pytest
import torch
from helpers import conversion_model, error_of, set_args, tiny_overrides
from hypothesis import given, settings
from hypothesis import strategies as st

from megatronlite.checkpoint import store
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint
from megatronlite.convert.model_state import run_config
from megatronlite.errors import UserError
from megatronlite.untrusted import DCP_METADATA_GLOBALS, read_dcp_metadata, unpickle

MODEL = conversion_model("llama", vocab_size=257)
CALLED = []


def boom(*args):
    """A callable a malicious pickle would like to reach; the fuzz test asserts it never runs."""
    CALLED.append(args)


def _text(s: str) -> bytes:
    data = s.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def dotted_call(module: str, name: str, arg: str) -> bytes:
    """Opcodes calling `module`.`name`(arg) through STACK_GLOBAL, where protocol 4 resolves dotted names."""
    return _text(module) + _text(name) + b"\x93" + _text(arg) + b"\x85R"  # STACK_GLOBAL, TUPLE1, REDUCE


class Raw:
    """Raw opcodes embedded in an otherwise ordinary pickle (see RawPickler)."""

    def __init__(self, code: bytes) -> None:
        self.code = code


class RawPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Raw] = lambda self, obj: self.write(obj.code)


class Trigger:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


def malicious_metadata(step_dir, variant: str, marker) -> bytes:
    """A `.metadata` that runs `touch marker` if unpickled without restriction."""
    cmd = f"touch {marker}"
    if variant == "reduce":  # the whole file is a call of os.system
        return pickle.dumps(Trigger(os.system, cmd), protocol=2)
    if variant == "dotted":  # an allowed module, a dotted name that resolves to os.system
        return b"\x80\x04" + dotted_call("torch.distributed.checkpoint.filesystem", "os.system", cmd) + b"."
    # nested: the checkpoint's real metadata, one field of it holding the dotted call
    md = read_dcp_metadata(step_dir)
    md.planner_data = {"x": Raw(dotted_call("torch.distributed.checkpoint.metadata", "os.system", cmd))}
    import io

    buffer = io.BytesIO()
    RawPickler(buffer, protocol=4).dump(md)
    return buffer.getvalue()


def _poison(step_dir, variant, marker) -> None:
    (step_dir / ".metadata").write_bytes(malicious_metadata(step_dir, variant, marker))


@pytest.fixture
def native(tmp_path):
    cfg = run_config(MODEL, "src")
    cfg.data.sources = [{"path": "unused"}]
    tensors = {n: torch.randn(s) for n, s in expected_shapes(cfg).items()}
    write_checkpoint(tmp_path / "src", cfg, tensors.items())
    return tmp_path / "src"


VARIANTS = ["reduce", "dotted", "nested"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_command_runs_code_from_a_native_checkpoint(tmp_path, native, corpus, capsys, variant):
    marker = tmp_path / "ran"
    step_dir = store.find_step_dir(native)
    _poison(step_dir, variant, marker)
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"checkpoint.load": str(native)})
    commands = {
        "train": ["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)],
        "generate": ["generate", str(native), "--prompt", "x", "--max-new-tokens", "2"],
        "convert-torch": ["convert", "--from", "mlite", "--to", "torch", str(native), str(tmp_path / "out.pt")],
        "convert-hf": ["convert", "--from", "mlite", "--to", "hf", str(native), str(tmp_path / "hf")],
    }
    for name, argv in commands.items():
        line = error_of(capsys, *argv)
        assert "metadata" in line and "not allowed" in line, (name, line)
        assert not marker.exists(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_code_runs_from_a_megatron_checkpoint(tmp_path, native, capsys, variant):
    from megatronlite.cli import main

    meg = tmp_path / "meg"
    main(["convert", "--from", "mlite", "--to", "megatron", str(native), str(meg)])
    marker = tmp_path / "ran"
    _poison(meg / "release", variant, marker)  # Megatron's layout: ITERATION_DIR/.metadata
    line = error_of(capsys, "convert", "--from", "megatron", "--to", "torch", str(meg), str(tmp_path / "out.pt"))
    assert "not allowed" in line
    assert not marker.exists()


def in_common_state_entry(iteration_dir, common) -> None:
    """Rewrite a torch_dist iteration as newer megatron-core (0.19) writes it: no common.pt; its content, as a
    one-item list, saved by torch.save into the DCP entry `common_state/shard_0_1` beside the tensors."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    class AsSerialized(dcp.DefaultSavePlanner):  # as megatron-core's planner: serialized bytes stored as given
        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    dcp_to_torch_save(iteration_dir, iteration_dir.parent / "tensors.pt")
    tensors = torch.load(iteration_dir.parent / "tensors.pt", weights_only=True)
    blob = io.BytesIO()
    torch.save([common], blob)
    metadata_json = (iteration_dir / "metadata.json").read_text()
    shutil.rmtree(iteration_dir)
    state = {**tensors, "common_state/shard_0_1": blob}
    dcp.save(state, checkpoint_id=iteration_dir, planner=AsSerialized(), no_dist=True)
    (iteration_dir / "metadata.json").write_text(metadata_json)


def test_megatron_core_common_state_entry_is_read_and_runs_no_code(tmp_path, native, capsys):
    """The common state inside the DCP files (megatron-core 0.19; tests/test_convert_megatron*.py run against
    0.16.1, which writes common.pt) converts as common.pt does; a poisoned one runs nothing."""
    from megatronlite.cli import main

    meg = tmp_path / "meg"
    main(["convert", "--from", "mlite", "--to", "megatron", str(native), str(meg)])
    main(["convert", "--from", "megatron", "--to", "torch", str(meg), str(tmp_path / "old.pt")])
    common = torch.load(meg / "release" / "common.pt", weights_only=False)
    in_common_state_entry(meg / "release", common)
    assert not (meg / "release" / "common.pt").exists()
    main(["convert", "--from", "megatron", "--to", "torch", str(meg), str(tmp_path / "new.pt")])
    old, new = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("old", "new"))
    assert (new["format"], new["config"]) == (old["format"], old["config"]) and old["model"]
    torch.testing.assert_close(new["model"], old["model"], rtol=0, atol=0)

    marker, bad = tmp_path / "ran", tmp_path / "bad"
    main(["convert", "--from", "mlite", "--to", "megatron", str(native), str(bad)])
    in_common_state_entry(bad / "release", Trigger(os.system, f"touch {marker}"))
    line = error_of(capsys, "convert", "--from", "megatron", "--to", "torch", str(bad), str(tmp_path / "bad.pt"))
    assert "common_state" in line, line  # refused by the weights-only unpickler
    assert not marker.exists()


def test_the_metadata_of_real_checkpoints_is_allowed(native):
    md = read_dcp_metadata(store.find_step_dir(native))
    assert md.state_dict_metadata  # our own files load through the allow-list


# --- the unpickler, fuzzed --------------------------------------------------------------------

ME = __name__
NAMES = st.sampled_from(
    sorted(DCP_METADATA_GLOBALS)
    + [
        (ME, "boom"),
        ("torch", f"{ME}.boom"),
        ("torch.distributed.checkpoint.metadata", "os.system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("os", "system"),
        ("posix", "system"),
        ("torch", "load"),
        ("torch.serialization", "os.system"),
        ("collections", "OrderedDict.fromkeys"),
        ("builtins", "set.__init__"),
        ("pathlib", "PosixPath.write_text"),
        ("torch", "Size.__reduce__"),
    ]
)
ATOMS = st.one_of(
    st.tuples(NAMES, st.text(max_size=4)).map(lambda c: dotted_call(c[0][0], c[0][1], c[1])),  # global(arg)
    NAMES.map(lambda mn: _text(mn[0]) + _text(mn[1]) + b"\x93"),  # STACK_GLOBAL
    NAMES.map(lambda mn: b"c" + f"{mn[0]}\n{mn[1]}\n".encode()),  # GLOBAL
    st.sampled_from(
        [
            b"R",
            b"\x85",
            b"\x86",
            b")",
            b"}",
            b"]",
            b"(",
            b"t",
            b"b",
            b"N",
            b"\x88",
            b"s",
            b"\x81",
            b"\x92",
            b"\x94",
            b"h\x00",
            b"e",
            b"a",
            b"0",
            b"2",
        ]
    ),  # REDUCE, tuples, BUILD, NEWOBJ...
    st.binary(max_size=4).map(lambda b: _text(b.hex())),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(1, 3).map(lambda i: b"\x82" + bytes([i])),  # EXT1: the copyreg extension registry
    st.just(b"P0\n"),  # PERSID
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ATOMS, max_size=24), st.binary(max_size=16))
def test_fuzzed_pickles_never_call_a_refused_global(atoms, tail):
    data = b"\x80\x04" + b"".join(atoms) + b"." + tail
    with mock.patch("os.system", boom):  # a dotted name reaching os.system would record the call
        try:
            unpickle(data, DCP_METADATA_GLOBALS)
        except pickle.UnpicklingError:
            pass
    assert not CALLED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_an_unpickling_error(data):
    try:
        unpickle(data, DCP_METADATA_GLOBALS)
    except pickle.UnpicklingError:
        pass
    assert not CALLED


def test_every_refusal_names_the_global():
    for module, name in [("os", "system"), ("torch.distributed.checkpoint.filesystem", "os.system"), (ME, "boom")]:
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            unpickle(b"\x80\x04" + dotted_call(module, name, "x") + b".", DCP_METADATA_GLOBALS)
    assert not CALLED


# --- storage locations are checked before DCP reads -------------------------------------------


def _rewrite_storage(step_dir, change) -> None:
    md = read_dcp_metadata(step_dir)
    for info in md.storage_data.values():
        change(info)
    (step_dir / ".metadata").write_bytes(pickle.dumps(md, protocol=4))


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda info: setattr(info, "relative_path", "../../etc/passwd"), "(a plain name, no path)"),
        (lambda info: setattr(info, "length", info.length + 10**9), "truncated or incomplete"),
        (lambda info: setattr(info, "offset", -5), "bad offset"),
    ],
    ids=["path", "length", "offset"],
)
def test_storage_outside_the_files_is_refused(native, capsys, change, expected):
    step_dir = store.find_step_dir(native)
    _rewrite_storage(step_dir, change)
    line = error_of(capsys, "generate", str(native), "--prompt", "x", "--max-new-tokens", "1")
    assert expected in line


def test_a_checkpoint_missing_shards_is_not_complete(native):
    """A kill during retention or a save can leave meta.json without (all of) the shards: never `latest`."""
    root = native / "checkpoints"
    first = store.find_step_dir(native)
    second = root / "step_0000009"
    shutil.copytree(first, second)
    (root / "latest").write_text(second.name)
    assert store.latest_complete(root) == second
    shard = next(second.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert not store.is_complete(second)
    assert store.latest_complete(root) == first
    shard.unlink()
    assert store.latest_complete(root) == first


# --- DCP metadata: every tensor is tiled exactly by stored chunks -------------------------------


def _dcp_dir(tmp_path, size, chunks, stored=None, path="f.distcp", properties="default"):
    """A DCP directory of one tensor `w` of `size`, split into `chunks` ((offsets, sizes) pairs); `stored`: the
    offsets with a storage entry (default: every chunk's)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    (tmp_path / "f.distcp").write_bytes(b"")
    stored = [o for o, _ in chunks] if stored is None else stored
    boxes = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
    props = TensorProperties(dtype=torch.float32) if properties == "default" else properties
    entry = TensorStorageMetadata(props, torch.Size(size), boxes)
    storage = {MetadataIndex("w", o): _StorageInfo(path, 0, 0) for o in stored}
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata({"w": entry}, storage_data=storage)))
    return tmp_path


ROWS = [((0, 0), (2, 4)), ((2, 0), (2, 4))]


@pytest.mark.parametrize(
    "size,chunks,extra,expected",
    [
        ((4, 4), [], {}, "chunks hold 0 values, the tensor [4, 4] has 16"),
        ((4, 4), ROWS[:1], {}, "chunks hold 8 values"),
        ((4, 4), [((0, 0), (3, 4)), ((1, 0), (1, 4))], {}, "overlap"),
        ((4, 4), [((0, 0), (2, 4)), ((3, 0), (2, 4))], {}, "lies outside [4, 4]"),
        ((4, 4), [((0,), (4,))], {}, "a chunk needs 2 non-negative offsets and sizes"),
        ((4, 4), [((-1, 0), (4, 4))], {}, "a chunk needs 2 non-negative offsets and sizes"),
        ((-4, 4), ROWS, {}, "size torch.Size([-4, 4]) is not a list of non-negative ints"),
        ((4, 4), ROWS, {"stored": [(0, 0)]}, "chunk at [2, 0] has no storage entry"),
        ((4, 4), ROWS, {"properties": None}, "properties None is not a TensorProperties"),
        ((4, 4), ROWS, {"path": "f.distcp\0x"}, "(a plain name, no path)"),
    ],
    ids=["no-chunks", "part", "overlap", "outside", "rank", "negative", "size", "unstored", "properties", "nul"],
)
def test_dcp_metadata_must_tile_each_tensor_exactly(tmp_path, size, chunks, extra, expected):
    directory = _dcp_dir(tmp_path, size, chunks, **extra)
    with pytest.raises(UserError) as error:
        read_dcp_metadata(directory)
    assert expected in str(error.value) and str(directory) in str(error.value)


def test_a_checkpoint_missing_chunks_is_refused_by_the_cli(native, capsys):
    step_dir = store.find_step_dir(native)
    md = read_dcp_metadata(step_dir)
    md.state_dict_metadata["model.embedding.word.weight"].chunks = []
    (step_dir / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    line = error_of(capsys, "convert", "--from", "mlite", "--to", "torch", str(native), str(native.parent / "o.pt"))
    assert "model.embedding.word.weight" in line and "chunks hold 0 values" in line


@pytest.mark.parametrize("dim", [0, 1])
def test_thousands_of_chunks_are_checked_quickly(tmp_path, dim):
    """ZeRO shards an optimizer state into several boxes per rank: 4000 chunks along either dim, checked in a
    sweep (an all-pairs loop would take seconds); the last one overlapping is still found."""
    import time

    n = 4000
    size = (n, 4) if dim == 0 else (4, n)
    chunks = [((i, 0), (1, 4)) if dim == 0 else ((0, i), (4, 1)) for i in range(n)]
    start = time.perf_counter()
    read_dcp_metadata(_dcp_dir(tmp_path, size, chunks))
    assert time.perf_counter() - start < 2.0
    overlapping = chunks[:-2] + [((n - 3, 0), (2, 4)) if dim == 0 else ((0, n - 3), (4, 2))]  # n - 1 left out
    with pytest.raises(UserError, match="overlap"):
        read_dcp_metadata(_dcp_dir(tmp_path, size, overlapping))


# --- torch files: every storage record holds the bytes its tensor needs -----------------------


def _rewrite_zip(path, change) -> None:
    """Rewrite the zip `path`, each member's (info, bytes) passed through `change`."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            info, data = change(info, data)
            z.writestr(info, data)


def _deflated(info, data):
    import zipfile

    info.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith("data/0") else zipfile.ZIP_STORED
    return info, data


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda info, data: (info, data[:8] if info.filename.endswith("data/0") else data), "holds 8 bytes"),
        (lambda info, data: (info, data + b"\0" * 4 if info.filename.endswith("data/0") else data), "holds 1028"),
        (_deflated, "holds 1024 bytes compressed"),
    ],
    ids=["truncated", "longer", "compressed"],
)
def test_a_torch_file_whose_record_does_not_fit_is_refused(tmp_path, change, expected):
    from megatronlite.untrusted import load_torch_file

    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(256.0), "b": torch.ones(3)}, path)
    assert load_torch_file(path)["w"].sum() == torch.arange(256.0).sum()
    _rewrite_zip(path, change)
    with pytest.raises(UserError, match=rf"t.pt: storage record data/0 {expected}"):
        load_torch_file(path)
