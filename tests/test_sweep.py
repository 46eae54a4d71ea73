"""Sweeps: expanding grid and random parameters, checking them, running trials locally, the report."""

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import error_of, read_metrics, tiny_overrides

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
    with pytest.raises(UserError, match=r"sweep s, trial \{'optim.lr': -1\}: config key 'optim.lr'"):
        sweep_spec.load(write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, -1]}}))


def test_dry_run_lists_trials_and_writes_nothing(capsys, tmp_path):
    path = write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3, 2e-3]}})
    main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep s: 2 trial(s), 0 already done; in {tmp_path / 'out'}"
    assert [line.split()[-1] for line in out[1:]] == ["optim.lr=0.001", "optim.lr=0.002"]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, corpus):
    """One small sweep run locally, two trials at a time, shared by the tests below: (sweep file, out, stdout)."""
    tmp = tmp_path_factory.mktemp("sweep")
    overrides = tiny_overrides(corpus, tmp / "x", **{"train.steps": 6, "train.eval_interval": 3, "train.eval_iters": 1})
    path = write_sweep(tmp, {"overrides": overrides, "grid": {"optim.lr": [1e-3, 4e-3]}})
    out = tmp / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["sweep", str(path), "--out", str(out), "--max-parallel", "2"])
    return path, out, printed.getvalue()


def summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_sweep_runs_reports_and_skips_done_trials(capsys, local_sweep):
    path, out, printed = local_sweep
    assert "| trial | optim.lr | status | final_loss | final_eval_loss | best_eval_loss | tokens_per_sec |" in printed
    rows = summary_rows(out)
    assert [r["status"] for r in rows] == ["done", "done"] and [r["optim.lr"] for r in rows] == ["0.001", "0.004"]
    for r in rows:
        assert float(r["best_eval_loss"]) <= float(r["final_eval_loss"]) and float(r["tokens_per_sec"]) > 0
        assert (out / r["trial"] / "config.yaml").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss curves](loss.png)" in (out / "summary.md").read_text()

    logs = {r["trial"]: (out / r["trial"] / "train.log").stat().st_size for r in rows}
    main(["sweep", str(path), "--out", str(out)])
    assert "2 trial(s), 2 already done" in capsys.readouterr().out
    assert logs == {r["trial"]: (out / r["trial"] / "train.log").stat().st_size for r in rows}  # nothing ran


def markdown_rows(path: Path) -> dict[str, dict]:
    """summary.md's table as {trial: {column: cell}}."""
    header, _, *body = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("|")]
    rows = [dict(zip((c.strip() for c in header), (c.strip() for c in cells))) for cells in body]
    return {r["trial"]: r for r in rows}


@pytest.mark.slow
def test_report_values_are_what_the_trials_logged(local_sweep):
    """Each row of summary.csv and summary.md against its trial's own metrics.jsonl: the last step's loss, the
    last and the lowest eval loss, and tokens/s as the median over the logged steps (step 1 pays for start-up)."""
    _, out, _ = local_sweep
    table = markdown_rows(out / "summary.md")
    for r in summary_rows(out):
        metrics = read_metrics(out / r["trial"])
        assert [m["step"] for m in metrics] == list(range(1, 7))
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        assert len(evals) == 2 and evals[0] != evals[1]
        want = {
            "final_loss": metrics[-1]["loss"],
            "final_eval_loss": evals[-1],
            "best_eval_loss": min(evals),
            "tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in metrics),
        }
        assert {k: float(r[k]) for k in want} == want, r["trial"]
        assert {k: table[r["trial"]][k] for k in want} == {k: f"{v:.4g}" for k, v in want.items()}, r["trial"]


def fake_trial(trial_dir: Path, records: list[dict], latest: str | None, committed: bool = True) -> None:
    """A trial's run directory written by hand: its metrics, and `checkpoints/latest` holding `latest` (if not None),
    which names a committed step directory (meta.json, written last) if `committed`."""
    (trial_dir / "checkpoints").mkdir(parents=True)
    (trial_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if latest is not None:
        (trial_dir / "checkpoints" / "latest").write_text(latest)
        if committed:
            (trial_dir / "checkpoints" / latest).mkdir()
            (trial_dir / "checkpoints" / latest / "meta.json").write_text("{}")


def test_report_takes_the_lowest_eval_loss_and_the_median_speed(tmp_path):
    """The trained trials' eval losses only fall, so this trial's metrics.jsonl is written by hand: its lowest eval
    loss is not its last, and its slow first step does not move the median tokens/s."""
    path = write_sweep(tmp_path, {"overrides": ["train.steps=3"], "grid": {"optim.lr": [1e-3]}})
    records = [
        {"step": 1, "loss": 5.0, "tokens_per_sec": 10.0},
        {"step": 2, "loss": 4.0, "tokens_per_sec": 1000.0, "eval_loss": 3.5},
        {"step": 3, "loss": 4.5, "tokens_per_sec": 1200.0, "eval_loss": 3.75},
    ]
    fake_trial(tmp_path / "out" / sweep_spec.load(path).trials[0].id, records, "step_0000003")
    main(["sweep", str(path), "--out", str(tmp_path / "out"), "--report"])
    [row] = summary_rows(tmp_path / "out")
    want = {"final_loss": 4.5, "final_eval_loss": 3.75, "best_eval_loss": 3.5, "tokens_per_sec": 1000.0}
    assert row["status"] == "done" and {k: float(row[k]) for k in want} == want


LOSSES = [{"step": s, "loss": 4.0} for s in (1, 2, 3)]


@pytest.mark.parametrize(
    "save, latest, committed, done",
    [
        (True, "step_0000003", True, True),
        (True, "step_0000002", True, False),  # logged step 3, but its checkpoint was never written
        (True, "step_0000003", False, False),  # `latest` names a step directory that is not committed
        (True, None, True, False),
        (True, "step_3\x00garbled", False, False),
        (False, None, True, True),  # checkpoint.save: false: its last logged step
    ],
)
def test_done_means_the_final_checkpoint_is_written(capsys, tmp_path, save, latest, committed, done):
    spec = {"overrides": ["train.steps=3", f"checkpoint.save={str(save).lower()}"], "grid": {"optim.lr": [1e-3]}}
    path, out = write_sweep(tmp_path, spec), tmp_path / "out"
    fake_trial(out / sweep_spec.load(path).trials[0].id, LOSSES, latest, committed)
    main(["sweep", str(path), "--out", str(out), "--dry-run"])
    assert f"1 trial(s), {int(done)} already done" in capsys.readouterr().out
    main(["sweep", str(path), "--out", str(out), "--report"])
    [row] = summary_rows(out)
    assert row["status"] == ("done" if done else f"{2 if latest == 'step_0000002' else 0}/3")


@pytest.mark.slow
def test_a_trial_killed_in_its_final_save_is_not_done(capsys, monkeypatch, tmp_path, corpus):
    """Killed while writing its last checkpoint, a trial has logged every step: it is still to run, and a re-run
    resumes it from its checkpoint before."""
    overrides = tiny_overrides(corpus, tmp_path / "x", **{"train.steps": 4, "checkpoint.interval": 2})
    path, out = write_sweep(tmp_path, {"overrides": overrides, "grid": {"optim.lr": [1e-3]}}), tmp_path / "out"
    monkeypatch.setenv("MEGATRONLITE_FAULT", "save:4")
    with pytest.raises(SystemExit, match="1"):
        main(["sweep", str(path), "--out", str(out)])
    assert "1 trial(s) did not finish" in capsys.readouterr().err
    [row] = summary_rows(out)
    assert row["status"] == "2/4" and [m["step"] for m in read_metrics(out / row["trial"])] == [1, 2, 3, 4]
    monkeypatch.delenv("MEGATRONLITE_FAULT")
    main(["sweep", str(path), "--out", str(out)])
    assert "1 trial(s), 0 already done" in capsys.readouterr().out
    assert [r["status"] for r in summary_rows(out)] == ["done"]
    assert "from step 2" in (out / row["trial"] / "train.log").read_text()


def test_trials_of_another_config_are_never_reused(capsys, tmp_path):
    """The same parameters under other overrides, another base or more steps are other trials, in other
    directories; a sweep that differs only in its name finds its trials done."""
    spec = {"overrides": ["train.steps=3"], "grid": {"optim.lr": [1e-3]}}
    path, out = write_sweep(tmp_path, spec), tmp_path / "out"
    fake_trial(out / sweep_spec.load(path).trials[0].id, LOSSES, "step_0000003")
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base["train"]["seed"] = 4321
    changed = [
        ({**spec, "overrides": ["train.steps=3", "optim.warmup_steps=2"]}, None),
        ({**spec, "overrides": ["train.steps=2"]}, None),
        (spec, yaml.safe_dump(base)),
    ]
    for other, base_text in changed:
        main(["sweep", str(write_sweep(tmp_path, other, base_text)), "--out", str(out), "--dry-run"])
        assert "1 trial(s), 0 already done" in capsys.readouterr().out, other
    main(["sweep", str(write_sweep(tmp_path, {**spec, "name": "renamed"})), "--out", str(out), "--dry-run"])
    assert "1 trial(s), 1 already done" in capsys.readouterr().out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_trial(tmp_path, corpus):
    """`kill PID` (or a scheduler) stopping a sweep stops its running trial too, which saves and releases its run
    directory, and the sweep ends promptly."""
    overrides = tiny_overrides(corpus, tmp_path / "x", **{"train.steps": 100_000, "checkpoint.interval": 0})
    path, out = write_sweep(tmp_path, {"overrides": overrides, "grid": {"optim.lr": [1e-3]}}), tmp_path / "out"
    trial_dir = out / sweep_spec.load(path).trials[0].id
    cmd = [sys.executable, "-m", "megatronlite", "sweep", str(path), "--out", str(out)]
    with open(tmp_path / "sweep.out", "w") as log:
        sweep = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    trial_pid = None
    try:
        deadline = time.monotonic() + 120
        while not (trial_pid and (trial_dir / "metrics.jsonl").is_file()):  # the trial has locked and trained
            assert sweep.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.out").read_text()
            with contextlib.suppress(OSError, ValueError):
                trial_pid = json.loads((trial_dir / ".lock").read_text())["pid"]
            time.sleep(0.1)
        start = time.monotonic()
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=90) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 60
        assert not pid_alive(trial_pid)
        with open(trial_dir / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises BlockingIOError while held
        assert (trial_dir / "checkpoints" / "latest").is_file()  # the trial saved on its way out
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        if trial_pid and pid_alive(trial_pid):
            os.kill(trial_pid, signal.SIGKILL)
