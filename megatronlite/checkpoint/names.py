"""The names in a run's `checkpoints/` directory, torch-free (a sweep's report reads them without torch):
`step_NNNNNNN/` per step, its `meta.json` written last (the commit), and `latest` naming the newest."""

from __future__ import annotations

import re
from pathlib import Path

META = "meta.json"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(step_dir: Path) -> int:
    return int(step_dir.name.removeprefix("step_"))


def latest_named(root: Path) -> Path | None:
    """The step directory `root/latest` names, or None. `latest` is trusted only to name a `step_N` beside it:
    never a path elsewhere."""
    try:
        name = (root / LATEST).read_bytes().decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if re.fullmatch(r"step_\d+", name) else None
