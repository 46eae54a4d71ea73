"""Sweeps: expanding grid and random parameters, checking them, running trials locally, the report."""

import csv
import math
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import error_of, tiny_overrides

from megatronlite.cli import main
from megatronlite.errors import UserError
from megatronlite.launcher import sweep_spec

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, spec: dict, base_text: str | None = None) -> Path:
    (tmp_path / "base.yaml").write_text(base_text or (REPO / "configs" / "demo.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", **spec}, sort_keys=False))
    return path



RANDOM = {"optim.lr": {"low": 3e-4, "high": 3e-2, "log": True}, "optim.warmup_steps": {"low": 1, "high": 9}}


def test_grid_times_random_draws_seeded(tmp_path):
    spec = {"grid": {"model.num_layers": [2, 4]}, "random": RANDOM, "trials": 3, "seed": 7}
    sweep = sweep_spec.load(write_sweep(tmp_path, spec))
    assert len(sweep.trials) == 6 and sweep.param_keys == ["model.num_layers", "optim.lr", "optim.warmup_steps"]
    assert [t.params["model.num_layers"] for t in sweep.trials] == [2, 2, 2, 4, 4, 4]
    for t in sweep.trials:
        assert 3e-4 <= t.params["optim.lr"] <= 3e-2 and isinstance(t.params["optim.lr"], float)
        assert isinstance(t.params["optim.warmup_steps"], int) and 1 <= t.params["optim.warmup_steps"] <= 9
    logs = [math.log10(t.params["optim.lr"]) for t in sweep.trials]
    assert max(logs) - min(logs) > 0.5  # log-uniform draws spread over decades
    assert sweep_spec.load(tmp_path / "sweep.yaml").trials == sweep.trials  # the seed makes it reproducible


def test_trial_ids_survive_extending_the_grid(tmp_path):
    before = sweep_spec.load(write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, 2e-3]}}))
    after = sweep_spec.load(write_sweep(tmp_path, {"grid": {"optim.lr": [5e-4, 1e-3, 2e-3]}}))
    assert {t.id for t in before.trials} < {t.id for t in after.trials}


def test_trial_config_and_wandb_group(tmp_path):
    sweep = sweep_spec.load(write_sweep(tmp_path, {"overrides": ["train.steps=7"], "grid": {"optim.lr": [1e-3]}}))
    cfg = sweep_spec.resolve_config(sweep, sweep.trials[0])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.name == f"s-{sweep.trials[0].id}"
    assert cfg.logging.wandb is None  # the sweep adds a wandb group only where the base logs to wandb
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base["logging"]["wandb"] = {"mode": "offline", "project": "p"}
    sweep = sweep_spec.load(write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3]}}, yaml.safe_dump(base)))
    cfg = sweep_spec.resolve_config(sweep, sweep.trials[0])
    assert cfg.logging.wandb == {"mode": "offline", "project": "p", "group": "s"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"gird": {}}, "unknown key 'gird'; did you mean 'grid'?; valid keys: name, base, overrides, grid, random"),
        (
            {"random": {"optim.lr": {"low": 1, "hi": 2}}},
            "random.optim.lr: unknown key 'hi'; did you mean 'high'?; valid keys: low, high, log",
        ),
        ({"random": {"optim.lr": {"low": 0, "high": 1, "log": True}}}, "need numbers low <= high (and low > 0"),
        ({"grid": {"optim.lr": 0.1}}, "grid.optim.lr: expected a non-empty list of values, got 0.1"),
        ({"grid": {"optim.lrr": [1]}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"grid": {"optim.lr": [-1]}}, "config key 'optim.lr' must be > 0, got -1"),
        ({"base": "missing.yaml"}, "base config not found"),
        ({"name": "a/b"}, "name 'a/b' must be letters, digits, '_', '.' or '-'"),
    ],
)
def test_bad_sweep_is_one_line(capsys, tmp_path, spec, message):
    line = error_of(capsys, "sweep", str(write_sweep(tmp_path, spec)), "--dry-run")
    assert message in line, line


def test_bad_trial_is_named(tmp_path):
    with pytest.raises(UserError, match=r"sweep s, trial t[0-9a-f]{8} \{'optim.lr': -1\}: config key 'optim.lr'"):
        sweep_spec.load(write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, -1]}}))


def test_dry_run_lists_trials_and_writes_nothing(capsys, tmp_path):
    path = write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, 2e-3]}})
    main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep s: 2 trial(s), 0 already done; in {tmp_path / 'out'}"
    assert [line.split()[-1] for line in out[1:]] == ["optim.lr=0.001", "optim.lr=0.002"]
    assert not (tmp_path / "out").exists()


def test_local_sweep_runs_reports_and_skips_done_trials(capsys, tmp_path, corpus):
    overrides = tiny_overrides(
        corpus, tmp_path / "x", **{"train.steps": 6, "train.eval_interval": 3, "train.eval_iters": 1}
    )
    path = write_sweep(tmp_path, {"overrides": overrides, "grid": {"optim.lr": [1e-3, 4e-3]}})
    out = tmp_path / "out"
    main(["sweep", str(path), "--out", str(out), "--max-parallel", "2"])
    printed = capsys.readouterr().out
    assert "| trial | optim.lr | status | final_loss | final_eval_loss | best_eval_loss | tokens_per_sec |" in printed
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "done"] and [r["optim.lr"] for r in rows] == ["0.001", "0.004"]
    for r in rows:
        assert float(r["best_eval_loss"]) <= float(r["final_eval_loss"]) and float(r["tokens_per_sec"]) > 0
        assert (out / r["trial"] / "config.yaml").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss curves](loss.png)" in (out / "summary.md").read_text()

    shutil.rmtree(out / rows[1]["trial"] / "checkpoints")  # the report still reads its metrics
    logs = {r["trial"]: (out / r["trial"] / "train.log").stat().st_size for r in rows}
    main(["sweep", str(path), "--out", str(out)])
    assert "2 trial(s), 2 already done" in capsys.readouterr().out
    assert logs == {r["trial"]: (out / r["trial"] / "train.log").stat().st_size for r in rows}  # nothing ran
