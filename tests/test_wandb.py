"""Weights & Biases, offline: a run logs its metrics to wandb/offline-run-*; a broken wandb costs one warning."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_metrics, set_args, tiny_overrides

from megatronlite.cli import main

REPO = Path(__file__).resolve().parents[1]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a .wandb file: LevelDB-log framing (a 7-byte file header, 32 KiB blocks,
    records with a 7-byte header: crc, length, type full/first/middle/last) around protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block = run_file.read_bytes(), 7, 32768
    payloads, pending = [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if pos + 7 + length > len(raw):  # still being written
            break
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            payloads.append(pending)
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            history = record.history
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in history.item}
            rows.append({"step": history.step.num, **row})
    return rows


def train(run: Path, corpus: str, *extra: str) -> None:
    sets = [*tiny_overrides(corpus, run, **{"train.steps": 4}), *extra]
    main(["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run directory wins
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def logged_rows(run: Path, rows: int) -> list[dict]:
    """The run's wandb history once it holds `rows` rows (wandb's service process may still be writing)."""
    [run_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    deadline = time.monotonic() + 60
    while len(history) < rows and time.monotonic() < deadline:
        time.sleep(0.2)
        history = wandb_history(run_file)
    return history


def test_offline_run_logs_metrics(tmp_path, corpus, offline):
    run = tmp_path / "run"
    train(run, corpus, "logging.wandb={mode: offline, project: t, group: g}")
    history = logged_rows(run, 4)
    metrics = read_metrics(run)
    assert [h["step"] for h in history] == [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == [m["loss"] for m in metrics]
    assert {"lr", "grad_norm", "tokens_per_sec", "consumed_samples"} <= set(history[-1])


def test_a_rewind_logs_the_redone_steps(tmp_path, corpus, offline, monkeypatch):
    """A spike at step 7 rewinds to step 4: the redone steps 5-7 reach wandb (its own step only goes up and
    dropped rows logged at an earlier one), charted over `step`."""
    monkeypatch.setenv("MEGATRONLITE_FAULT", "spike:7")
    run = tmp_path / "run"
    spike = ["train.steps=10", "train.loss_spike_factor=3.0", "train.on_loss_spike=rewind"]
    train(run, corpus, "logging.wandb={mode: offline, project: t}", *spike)
    history = logged_rows(run, 12)  # steps 1-6, then (the spike rewound to step 4) 5-10
    assert [h["step"] for h in history] == [*range(1, 7), *range(5, 11)]
    assert [(h["step"], h["loss"]) for h in history[6:]] == [(m["step"], m["loss"]) for m in read_metrics(run)[4:]]


def test_blocked_wandb_warns_once_and_trains_on(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"wandb disabled: .*pip install 'megatronlite\[wandb\]'") as warned:
        train(run, corpus, "logging.wandb={mode: offline, project: t}")
    assert len([w for w in warned if "wandb" in str(w.message)]) == 1
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


def test_online_without_key_or_network_trains_on(tmp_path, corpus):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),  # no ~/.netrc with a key
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there: no network either way
    }
    sets = [*tiny_overrides(corpus, run, **{"train.steps": 4}), "logging.wandb={mode: online, project: t}"]
    cmd = [sys.executable, "-m", "megatronlite", "train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("wandb disabled") == 1, done.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
