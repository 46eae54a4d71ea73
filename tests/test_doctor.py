"""`megatronlite doctor` reports what is installed and reachable, each probe on its own line."""

import importlib.metadata
import os
import stat

import torch

from megatronlite.cli import main
from megatronlite.doctor import OPTIONAL


def _doctor(capsys) -> dict[str, str]:
    main(["doctor"])
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


def test_versions_kernels_and_no_slurm(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo here
    got = _doctor(capsys)
    assert got["torch"] == f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    assert got["megatron-core"].startswith(importlib.metadata.version("megatron-core") + "  [")
    for dist, _ in OPTIONAL:
        try:
            want = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            want = "not installed"
        assert got[dist].startswith(want + "  ["), dist
    assert got["auto picks"].startswith("kernels on cpu: rms_norm=torch")
    assert got["Slurm"] == "no sinfo on PATH"


def test_a_reachable_slurm_is_listed(capsys, monkeypatch, tmp_path):
    sinfo = tmp_path / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'debug* up 1 idle'\n")
    sinfo.chmod(sinfo.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _doctor(capsys)["Slurm"] == "reachable; partitions (name avail nodes state): debug* up 1 idle"
