"""`megatronlite train CONFIG --dry-run`, and the memory check a real run makes before its first step."""

import re
import subprocess
import sys

import pytest
import yaml
from helpers import set_args, tiny_overrides, train

from megatronlite import config
from megatronlite.cli import main
from megatronlite.plan import device_fit
from megatronlite.train.run_lock import RunLock


def dry_run(run_dir, sets, *extra):
    main(["train", "configs/demo.yaml", "--dry-run", "--run-dir", str(run_dir), *extra, *set_args(sets)])


def refusal(capsys, run_dir, sets, *extra) -> str:
    """The one-line error a refused dry run prints (it exits 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        dry_run(run_dir, sets, *extra)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"parallel.tensor": 2, "parallel.pipeline": 2, "train.global_batch_size": 8})
    dry_run(run, sets, "--workers", "8")
    out = capsys.readouterr().out
    assert not run.exists()
    assert "layout: tp2 pp2 cp1 dp2 mb2 none on 8 worker(s), device cpu" in out, out
    assert "start: step 0" in out and "sample index" in out and "every check passed;" in out, out
    resolved = yaml.safe_load(out.split("resolved config:\n", 1)[1].rsplit("\nmegatronlite:", 1)[0])
    assert resolved == config.load("configs/demo.yaml", [*sets, "train.precision=fp32"]).to_dict()  # auto, on CPU


def test_dry_run_refuses_what_the_run_would_refuse(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"parallel.tensor": 2})
    assert "parallel.tensor" in refusal(capsys, run, sets, "--workers", "3")  # 3 workers cannot hold tp2
    lock = RunLock(run)
    try:
        assert "in use by another trainer" in refusal(capsys, run, tiny_overrides(corpus, run))
    finally:
        lock.release()


def test_dry_run_checks_the_checkpoint_against_the_model(tmp_path, corpus, capsys):
    source = tmp_path / "source"
    train(source, tiny_overrides(corpus, source, **{"train.steps": 4}))
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"checkpoint.load": str(source)})
    dry_run(run, sets, "--workers", "2", "--set", "parallel.pipeline=2")  # another layout: the same weights
    assert f"start: {source / 'checkpoints' / 'step_0000004'} (step 4; its weights match" in capsys.readouterr().out
    error = refusal(capsys, run, [*sets, "model.ffn_hidden_size=96"])
    assert re.search(r"does not match the model config: model\.\S+ is \[.*config needs", error), error


def test_dry_run_errors_are_one_line_exit_2(tmp_path, corpus):
    run = tmp_path / "run"
    args = ["train", "configs/demo.yaml", "--dry-run", "--workers", "3", "--run-dir", str(run)]
    args += set_args(tiny_overrides(corpus, run, **{"parallel.tensor": 2}))
    done = subprocess.run([sys.executable, "-m", "megatronlite", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "parallel.tensor" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_layout_predicted_not_to_fit_warns_before_the_first_step(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(device_fit, "capacity", lambda device, here: 2**20)  # a 1 MiB device
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.steps": 1})
    dry_run(run, sets)
    out = capsys.readouterr().out
    assert "warning: the layout is predicted not to fit: pipeline stage 0 needs" in out, out
    assert "more than cpu memory per worker (1 MiB)" in out and "(but see the memory warning)" in out, out
    train(run, sets)
    out = capsys.readouterr().out
    warning = out.index("megatronlite: warning: the layout is predicted not to fit")
    assert warning < out.index("step 1"), out  # named before training starts, and the run still goes on
