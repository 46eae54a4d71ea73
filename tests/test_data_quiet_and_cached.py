"""Data set-up a user does not see: caches in one per-user place, no warnings about libraries a CPU run lacks."""

import subprocess
import sys
from pathlib import Path

from megatronlite import config
from megatronlite.data import cache
from megatronlite.data.run import build_run_data

REPO = Path(__file__).resolve().parents[1]


def test_builtin_corpus_is_cached_per_user_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MEGATRONLITE_STDLIB_MAX_BYTES", "200000")
    cfg = config.load(
        REPO / "configs/demo.yaml", ["train.steps=2", "train.seq_len=64", "model.max_seq_len=64", "data.split=50,50"]
    )
    built = {}
    for cwd in ("here", "there"):
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        build_run_data(cfg)
        assert not (tmp_path / cwd / ".cache").exists()
        corpus = sorted((tmp_path / "xdg" / "megatronlite").glob("builtin-stdlib-*.bin"))
        assert len(corpus) == 1, corpus
        built[cwd] = corpus[0].stat().st_mtime_ns
    assert built["here"] == built["there"]  # found, not rebuilt, from another directory

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.directory(None) == tmp_path / "home" / ".cache" / "megatronlite"
    assert cache.directory("elsewhere") == Path("elsewhere")  # data.cache_dir wins


def test_blending_does_not_warn_that_transformer_engine_and_apex_are_missing():
    code = "from megatronlite.data.blending import blending_indices; blending_indices([1.0, 2.0], 10)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Transformer Engine and Apex" not in out.stderr, out.stderr
