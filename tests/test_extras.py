"""A missing optional dependency is one line naming the extra to install, never a traceback. Each module is made
missing in this process (`sys.modules[name] = None` makes its import fail), so this runs in a dev install."""

import sys
from pathlib import Path

import pytest
from helpers import error_of
from test_convert_cli import native
from test_sweep import write_sweep

from megatronlite.cli import main
from megatronlite.errors import UserError
from megatronlite.extras import require

HF = "pip install 'megatronlite[hf]'"


def test_require_returns_the_module():
    assert require("json", "x", "y") is sys.modules["json"]


def test_a_missing_module_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # even if another test imported it
    with pytest.raises(UserError) as e:
        require("matplotlib.pyplot", "sweep", "the plot")
    assert str(e.value) == "the plot needs matplotlib: pip install 'megatronlite[sweep]'"


def test_a_broken_installed_module_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "installed_but_broken.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_anywhere"):
        require("installed_but_broken", "x", "y")


def hf_model(tmp_path: Path) -> Path:
    """A tiny HF model directory (writing one needs no extra)."""
    src, _ = native(tmp_path)
    main(["convert", "--from", "mlite", "--to", "hf", str(src), str(tmp_path / "hf")])
    return tmp_path / "hf"


def test_convert_from_hf_without_safetensors(tmp_path, capsys, monkeypatch):
    hf = hf_model(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    line = error_of(capsys, "convert", "--from", "hf", "--to", "mlite", str(hf), str(tmp_path / "out"))
    assert line == "megatronlite: error: convert --from hf needs safetensors: " + HF


def test_verify_with_hf_without_transformers(tmp_path, capsys, monkeypatch):
    hf = hf_model(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    line = error_of(capsys, "convert", "--from", "hf", "--to", "torch", str(hf), str(tmp_path / "m.pt"), "--verify")
    assert line == "megatronlite: error: convert --verify with an hf model needs transformers: " + HF
    assert not (tmp_path / "m.pt").exists()  # refused before converting


def test_sweep_without_matplotlib_refuses_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, 2e-3]}})
    main(["sweep", str(path), "--dry-run"])  # listing the trials draws nothing
    capsys.readouterr()
    line = error_of(capsys, "sweep", str(path), "--out", str(tmp_path / "out"))
    assert (
        line
        == "megatronlite: error: a sweep's loss plot (loss.png) needs matplotlib: pip install 'megatronlite[sweep]'"
    )
    assert not (tmp_path / "out").exists()


def test_tokenizer_train_without_tokenizers(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("some text\n")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    args = ("tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--output", str(tmp_path))
    assert error_of(capsys, *args) == "megatronlite: error: tokenizer train needs tokenizers: " + HF


def test_zst_input_without_zstandard(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    args = ("preprocess", "--input", str(tmp_path / "a.jsonl.zst"), "--output-prefix", str(tmp_path / "out"))
    line = error_of(capsys, *args)
    assert line == "megatronlite: error: reading a.jsonl.zst (.zst) needs zstandard: pip install 'megatronlite[data]'"


def test_byte_tokenizer_export_without_tokenizers(tmp_path, monkeypatch):
    from megatronlite.convert.byte_tokenizer import write_hf_files

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError) as e:
        write_hf_files(tmp_path, 64)
    assert str(e.value) == "convert --to hf (the byte tokenizer's tokenizer.json) needs tokenizers: " + HF
