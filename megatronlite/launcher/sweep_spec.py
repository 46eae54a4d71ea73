"""A sweep file and the trials it expands to.

```yaml
name: lr-width
base: ../demo.yaml                # relative to this file
overrides: [train.steps=200]      # applied to every trial, as with --set
grid:                             # every combination...
  model.hidden_size: [128, 256]
random:                           # ...crossed with `trials` random draws (seeded)
  optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  optim.warmup_steps: [10, 20, 40]
trials: 4
seed: 0
```

A trial's id is a hash of its whole resolved config but its name (see `_trial_id`): editing the sweep
(another grid value, more trials) keeps the ids, and the run directories, of the trials that did not change.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatronlite import config
from megatronlite.errors import UserError

SWEEP_KEYS = ("name", "base", "overrides", "grid", "random", "trials", "seed")
RANGE_KEYS = ("low", "high", "log")
MAX_TRIALS = 10_000  # grid combinations x random trials: each is a config checked now and a run later


def _yaml_value(value: Any) -> str:
    """`value` as YAML that --set parses back to it (json would write 1e-05, which YAML reads as a string)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


@dataclass(frozen=True)
class Trial:
    id: str
    params: dict[str, Any]  # config key -> value, in the sweep file's order

    def overrides(self) -> list[str]:
        return _set_args(self.params)


def _set_args(params: dict[str, Any]) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in params.items()]


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path
    overrides: list[str]
    trials: list[Trial]

    @property
    def param_keys(self) -> list[str]:
        return list(dict.fromkeys(k for t in self.trials for k in t.params))


def _unknown_key(where: str, key: Any, valid: tuple[str, ...]) -> UserError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of config keys, got {value!r}")
    return value


def _draw(rng: random.Random, key: str, spec: Any, where: str) -> Any:
    """One value for `key`: a choice from a list, or from a {low, high, log} range (ints stay ints)."""
    if isinstance(spec, list) and spec:
        return spec[rng.randrange(len(spec))]
    if not isinstance(spec, dict):
        raise UserError(f"{where}.{key}: expected a list of choices or {{low, high, log}}, got {spec!r}")
    for k in spec:
        if k not in RANGE_KEYS:
            raise _unknown_key(f"{where}.{key}", k, RANGE_KEYS)
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
    if not numbers or low > high or (log and low <= 0):
        raise UserError(f"{where}.{key}: need numbers low <= high (and low > 0 with log: true), got {spec!r}")
    u = rng.random()
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
    return round(value) if isinstance(low, int) and isinstance(high, int) else float(f"{value:.6g}")


def _trial_id(cfg: config.Config) -> str:
    """A hash of everything the trial trains with, but its name and wandb group (the sweep's name goes there).

    Not of its parameters alone: a trial directory is skipped as done or resumed from its checkpoint, so a second
    sweep into the same directory, or this one with another base or overrides, must never meet a directory of
    another config and take its results as its own. Another config is another trial, in a directory of its own.
    """
    settings = {k: v for k, v in cfg.to_dict().items() if k != "name"}  # in field order: free-form keys may mix types
    return "t" + hashlib.sha1(json.dumps(settings, default=str).encode()).hexdigest()[:8]


def _plain(value: Any) -> bool:
    """A value --set can carry: YAML's plain scalars, lists of them, mappings with string keys."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str)


def expand(grid: dict, rand: dict, trials: int, seed: int, where: str) -> list[dict[str, Any]]:
    """The parameters of the grid's combinations, each with `trials` random draws."""
    for section, values_of in (("grid", grid), ("random", rand)):
        for key, values in values_of.items():
            if not isinstance(key, str) or not _plain(values):
                raise UserError(
                    f"{where} {section}.{key}: {values!r} is not a plain YAML value (numbers, strings, booleans, "
                    "null, lists, mappings with string keys)"
                )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where} grid.{key}: expected a non-empty list of values, got {values!r}")
    total = math.prod(len(values) for values in grid.values()) * (trials if rand else 1)
    if total > MAX_TRIALS:
        raise UserError(f"{where}: the sweep has {total} trials (grid x trials); at most {MAX_TRIALS} are allowed")
    rng = random.Random(seed)
    out = []
    for combo in itertools.product(*grid.values()):
        for _ in range(trials if rand else 1):
            params = dict(zip(grid, combo))
            params.update({k: _draw(rng, k, spec, f"{where} random") for k, spec in rand.items()})
            out.append(params)
    return out


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file; every trial's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    raw = config.read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise _unknown_key(str(path), key, SWEEP_KEYS)
    for key in ("name", "base"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise UserError(f"{path}: '{key}' is required (a string)")
    if not re.fullmatch(r"[\w.-]+", raw["name"]):
        raise UserError(f"{path}: name {raw['name']!r} must be letters, digits, '_', '.' or '-' (it names directories)")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{path}: 'overrides' must be a list of KEY=VALUE strings")
    grid, rand = _mapping(raw.get("grid"), f"{path} grid"), _mapping(raw.get("random"), f"{path} random")
    trials, seed = raw.get("trials", 1), raw.get("seed", 0)
    if not isinstance(trials, int) or trials < 1 or not isinstance(seed, int):
        raise UserError(f"{path}: 'trials' must be an integer >= 1 and 'seed' an integer")
    if set(grid) & set(rand):
        raise UserError(f"{path}: {', '.join(sorted(set(grid) & set(rand)))} is in both grid and random")
    base = path.parent / raw["base"]
    if not base.is_file():
        raise UserError(f"{path}: base config not found: {base}")
    sweep = Sweep(raw["name"], base, overrides, [])
    by_id: dict[str, Trial] = {}
    for params in expand(grid, rand, trials, seed, str(path)):  # a config drawn twice is one trial
        tid = _trial_id(_resolve(sweep, params))
        by_id.setdefault(tid, Trial(tid, params))
    return dataclasses.replace(sweep, trials=list(by_id.values()))


def _resolve(sweep: Sweep, params: dict[str, Any], trial_id: str | None = None) -> config.Config:
    """Base, the sweep's overrides and `params`; with `trial_id`, also the trial's name and wandb group."""
    sets = sweep.overrides + _set_args(params)
    try:
        raw = config.apply_overrides(config.load_raw(sweep.base), sets)
        if trial_id is not None:
            raw = config.apply_overrides(raw, [f"name={sweep.name}-{trial_id}"])
            if isinstance(raw.get("logging"), dict) and raw["logging"].get("wandb"):
                raw = config.apply_overrides(raw, [f"logging.wandb.group={sweep.name}"])
        cfg = config.from_dict(raw)
        config.check_inputs(cfg)  # before any trial is launched
        return cfg
    except UserError as e:
        raise UserError(f"sweep {sweep.name}, trial {trial_id + ' ' if trial_id else ''}{params}: {e}") from None


def resolve_config(sweep: Sweep, trial: Trial) -> config.Config:
    """The trial's full config: base, the sweep's overrides, its parameters, its name and wandb group."""
    return _resolve(sweep, trial.params, trial.id)
