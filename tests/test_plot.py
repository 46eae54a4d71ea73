"""`megatronlite plot`: runs' metrics drawn into one PNG, a panel per quantity and a line per run."""

import json
import sys

import pytest
from helpers import error_of

from megatronlite.cli import main
from megatronlite.curves import panels


def _run(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_panels_put_the_losses_together():
    assert panels(["loss", "tokens_per_sec", "eval_loss", "lr"]) == [["loss", "eval_loss"], ["tokens_per_sec"], ["lr"]]


def test_two_runs_three_metrics(tmp_path, monkeypatch):
    import matplotlib.figure

    a = _run(tmp_path / "a", [{"step": s, "loss": 5 - s, "tokens_per_sec": 100.0 + s} for s in (1, 2, 3)])
    b = _run(tmp_path / "b", [{"step": 2, "loss": 4.0, "eval_loss": 4.5, "tokens_per_sec": 90.0}])
    drawn = {}

    def savefig(fig, path, **kwargs):  # what would be drawn, then the real file
        drawn["axes"] = [
            (ax.get_ylabel(), [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines])
            for ax in fig.axes
        ]
        return original(fig, path, **kwargs)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = tmp_path / "curves.png"
    main(["plot", str(a), str(b), "--metric", "loss,eval_loss,tokens_per_sec", "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (loss_label, loss_lines), (speed_label, speed_lines) = drawn["axes"]
    assert loss_label == "loss / eval_loss (dashed)" and speed_label == "tokens_per_sec"
    assert loss_lines[0] == ("a", [1, 2, 3], [4, 3, 2])
    assert loss_lines[1] == ("b", [2], [4.0]) and loss_lines[2][1:] == ([2], [4.5])  # b's eval, dashed, same color
    assert [line[2] for line in speed_lines] == [[101.0, 102.0, 103.0], [90.0]]


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    a = _run(tmp_path / "a", [{"step": 1, "loss": 5.0}])
    line = error_of(capsys, "plot", str(a), "--metric", "loss,mfu_typo")
    assert line == "megatronlite: error: --metric mfu_typo: not in any run's metrics.jsonl; logged keys: loss"
    line = error_of(capsys, "plot", str(tmp_path / "nope"))
    assert line == f"megatronlite: error: {tmp_path / 'nope'}: no metrics.jsonl with records (expected a run directory)"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = error_of(capsys, "plot", str(a), "-o", str(tmp_path / "c.png"))  # default metrics: loss (no eval here)
    assert line == "megatronlite: error: megatronlite plot needs matplotlib: pip install 'megatronlite[sweep]'"


@pytest.mark.parametrize("metric", [",", ""])
def test_no_metric_is_refused(tmp_path, capsys, metric):
    a = _run(tmp_path / "a", [{"step": 1, "loss": 5.0}])
    assert "--metric: name at least one" in error_of(capsys, "plot", str(a), "--metric", metric)
