import math

import pytest

from megatronlite.config import OptimConfig
from megatronlite.optim.schedules import lr_at


def cfg(schedule, **kw):
    return OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    assert [lr_at(s, cfg(schedule), 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine():
    c = cfg("cosine")
    assert lr_at(10, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    assert lr_at(500, c, 110) == pytest.approx(0.1)


def test_linear():
    assert lr_at(60, cfg("linear"), 110) == pytest.approx(0.55)


def test_wsd_stable_then_decays():
    c = cfg("wsd", decay_fraction=0.2)
    assert lr_at(79, c, 100) == 1.0
    assert lr_at(90, c, 100) == pytest.approx(0.55)
    assert lr_at(100, c, 100) == pytest.approx(0.1)


def test_constant():
    assert lr_at(99, cfg("constant"), 100) == 1.0
