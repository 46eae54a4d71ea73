"""`make gpu-check GPU_DRY_RUN=1` (bench/gpu_check.py --dry-run): the GPU check's steps on CPU at tiny sizes.

GPU machines are lent rarely and briefly; this keeps the kit from rotting in between: every step must
run (or be skipped for a stated reason) and the report must hold each step's row and results.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["pytest -m gpu", "train 1B", "kernels", "train 125M", "checkpoint save/load"]


@pytest.mark.slow
def test_dry_run_reports_every_step_ok_or_skipped(tmp_path):
    cmd = [sys.executable, "bench/gpu_check.py", "--dry-run", "--results", str(tmp_path), "--work", str(tmp_path / "w")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    [report_file] = tmp_path.glob("gpu_check_*-dry-run_*.md")
    report = report_file.read_text()
    table = report.split("\n## ")[0]  # the steps' table, before the sections with the benches' own tables
    statuses = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| [\d.]* \| ", table, re.MULTILINE))
    assert list(statuses) == STEPS, report
    failed = {step: status for step, status in statuses.items() if status not in ("ok", "skipped")}
    assert not failed, f"{failed}\n{report[-6000:]}"
    assert done.returncode == 0, done.stdout[-3000:]
    assert "- GPU: none (no CUDA device)" in report
    for row in (
        "| megatronlite |",
        "| megatronlite (torch.compile) |",
        "| HF LlamaForCausalLM (sdpa) |",
        "| rms_norm |",
    ):
        assert row in report, row
    assert re.search(r"save \(synchronous, committed\): [\d.]+ s", report), report
