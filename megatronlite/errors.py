"""The one exception type a user sees: its message is printed on one line and the CLI exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix: a config key, a file, a value. Never a bug in megatronlite."""


def unknown_key(key: object, valid: Sequence[str], prefix: str = "") -> UserError:
    """The error for a mistyped config key: the closest valid key, or all of them when none is close."""
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key '{prefix}{key}'; {hint}")


def made_dir(path: Path, what: str) -> Path:
    """`path` as a directory, made with its parents if missing: a path the user gave that cannot be one (under a
    file, no permission) is theirs to fix, in one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot make the directory ({e.strerror})") from None
    return path
