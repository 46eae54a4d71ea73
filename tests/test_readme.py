"""The README's copies of project files stay true to them."""

import dataclasses
from pathlib import Path

import yaml

from megatronlite.config import ParallelConfig

REPO = Path(__file__).resolve().parents[1]


def _tour_block() -> dict:
    text = (REPO / "README.md").read_text()
    start = text.index("```yaml\nname: demo") + len("```yaml\n")
    return yaml.safe_load(text[start : text.index("```", start)])


def test_the_config_tour_is_the_demo_config_plus_the_parallel_defaults():
    tour = _tour_block()
    parallel = tour.pop("parallel")
    assert tour == yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    defaults = dataclasses.asdict(ParallelConfig())
    assert parallel == {key: defaults[key] for key in parallel}
