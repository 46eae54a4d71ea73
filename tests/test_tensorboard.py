"""TensorBoard event files hold the scalars of metrics.jsonl (read back with TensorBoard's own reader); a
missing tensorboard costs one warning, never the run."""

import sys
from pathlib import Path

import pytest
from helpers import read_metrics, set_args, tiny_overrides

from megatronlite.cli import main

REPO = Path(__file__).resolve().parents[1]


def train(run: Path, corpus: str, *extra: str) -> None:
    sets = [*tiny_overrides(corpus, run, **{"train.steps": 4, "train.eval_interval": 2}), *extra]
    main(["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)])


def test_event_files_hold_the_metrics(tmp_path, corpus, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    train(run, corpus, "logging.tensorboard=true")
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    records = read_metrics(run)
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples", "eval_loss"):
        scalars = events.Scalars(key)
        want = [(r["step"], r[key]) for r in records if key in r]
        assert [s.step for s in scalars] == [step for step, _ in want], key
        assert [s.value for s in scalars] == pytest.approx([v for _, v in want], rel=1e-6), key  # stored as float32
    assert [s.step for s in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_rewind_hides_the_abandoned_steps(tmp_path, corpus, monkeypatch):
    """A spike at step 7 rewinds to step 4: TensorBoard shows steps 5-7 once, the redone values, as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MEGATRONLITE_FAULT", "spike:7")
    run = tmp_path / "run"
    spike = {"train.steps": 10, "train.loss_spike_factor": 3.0, "train.on_loss_spike": "rewind"}
    sets = tiny_overrides(corpus, run, **spike, **{"logging.tensorboard": "true"})
    main(["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)])
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    scalars = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("loss")
    assert [(s.step, s.value) for s in scalars] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def test_missing_tensorboard_warns_once_and_trains_on(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"tensorboard disabled: .*pip install 'megatronlite\[tensorboard\]'") as w:
        train(run, corpus, "logging.tensorboard=true")
    assert len([x for x in w if "tensorboard" in str(x.message)]) == 1
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4] and not (run / "tensorboard").exists()
