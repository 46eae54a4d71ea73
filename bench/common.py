"""What the benchmark scripts share: starting themselves under torchrun, and printing/recording a result."""

from __future__ import annotations

import os
import subprocess
import sys


def run_under_torchrun(
    script: str, args: list[str], nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`script args` as `nproc` gloo workers on this machine (a port derived from our pid), `env` added to ours."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={29500 + os.getpid() % 500}",
        script,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def emit(text: str, markdown: str | None) -> None:
    """Print a result, and append it to `markdown` (a bench/results file) when given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write(text.rstrip("\n") + "\n\n")
