"""fp16 dynamic loss scaling: skip on overflow, back off, grow, and resume with the same scale."""

import json
import math
from types import SimpleNamespace

import pytest
from helpers import resume_from, tiny_overrides, train

from megatronlite.optim.loss_scale import LossScaler, from_deepspeed


def test_overflow_skips_and_halves_then_grows():
    scaler = LossScaler(1024.0, growth_interval=3, min_scale=256.0)
    assert scaler.update(math.inf) is False and scaler.scale == 512.0
    assert scaler.update(math.nan) is False and scaler.scale == 256.0
    assert scaler.update(math.inf) is False and scaler.scale == 256.0  # never below min_scale
    assert scaler.skipped == 3
    assert [scaler.update(1.0) for _ in range(3)] == [True] * 3
    assert scaler.scale == 512.0  # grown after growth_interval good steps in a row
    scaler.update(1.0)
    scaler.update(math.inf)  # an overflow restarts the count of good steps
    assert [scaler.update(1.0) for _ in range(2)] == [True, True] and scaler.scale == 256.0


def test_state_round_trip():
    scaler = LossScaler(2.0**16, growth_interval=4)
    for norm in (math.inf, 1.0, 1.0):
        scaler.update(norm)
    restored = LossScaler(1.0, growth_interval=4)
    restored.load_state(json.loads(json.dumps(scaler.state())))
    assert restored.state() == scaler.state() == {"scale": 2.0**15, "good_steps": 2, "skipped": 1}
    for _ in range(2):
        assert restored.update(1.0) == scaler.update(1.0)
    assert restored.scale == scaler.scale == 2.0**16


def test_the_scale_moves_between_engines_with_the_good_steps_since_an_overflow():
    """A checkpoint of the DeepSpeed engine resumed on the native one (and back) goes on at the scale it reached and
    with the good steps since its last overflow, not at `optim.initial_loss_scale` (which overflows again)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megatronlite.engine.deepspeed_zero import LOSS_SCALE_FIELDS, DeepSpeedEngine

    theirs = DynamicLossScaler(2.0**10, 2.0, 4, 1.0, 2, False)
    theirs.cur_iter, theirs.last_overflow_iter = 7, 4  # an overflow at its 5th step, then 2 good ones
    ours = LossScaler(2.0**24, growth_interval=4)
    ours.load_state(from_deepspeed({name: getattr(theirs, name) for name in LOSS_SCALE_FIELDS}, skipped=3))
    assert ours.state() == {"scale": 2.0**10, "good_steps": 2, "skipped": 3}

    back = DynamicLossScaler(2.0**24, 2.0, 4, 1.0, 2, False)  # a fresh DeepSpeed engine's scaler
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)
    engine.optimizer = SimpleNamespace(loss_scaler=back)
    engine.restore_values({"loss_scale": ours.state(), "deepspeed_loss_scale": None})
    assert back.cur_scale == 2.0**10 and back.cur_iter - back.last_overflow_iter - 1 == 2


def test_fp16_run_backs_off_reports_and_resumes_exactly(tmp_path, corpus):
    """A too-large initial scale overflows: steps are skipped until it fits; metrics.jsonl stays strict
    JSON (the overflowing grad norm is null); a resume restores the scale and gives the same losses."""
    sets = {"train.precision": "fp16", "optim.initial_loss_scale": 2.0**24}
    full = tmp_path / "full"
    reference = train(full, tiny_overrides(corpus, full, **sets))
    for line in (full / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity
    skipped = [m for m in reference if m["grad_norm"] is None]
    assert reference[0]["grad_norm"] is None and reference[0]["loss_scale"] == 2.0**23  # 2**24 overflows
    assert reference[-1]["skipped_steps"] == len(skipped) < len(reference)  # and a smaller scale fits
    assert reference[-1]["loss_scale"] == 2.0**24 / 2 ** len(skipped)
    resumed = tmp_path / "resumed"
    resume_from(full, "step_0000004", resumed)
    after = train(resumed, tiny_overrides(corpus, resumed, **sets))
    keys = ("loss", "grad_norm", "loss_scale", "skipped_steps")
    assert [[m[k] for k in keys] for m in after] == [[m[k] for k in keys] for m in reference[4:]]
