"""Fields read from files other people made (configs, checkpoint metadata), each checked for its type and range
before use: a bad one is one line naming the file and key and what is valid, never a traceback deep in a
conversion. Torch-free, so `config from-megatron` reads Megatron's args with the same checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from megatronlite.config import read_text
from megatronlite.errors import UserError


class Kind(NamedTuple):
    what: str  # what a valid value is, for the message
    test: Callable[[Any], bool]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ANY = Kind("a value", lambda v: True)
POSITIVE = Kind("an integer >= 1", lambda v: _int(v) and v >= 1)
COUNT = Kind("an integer >= 0", lambda v: _int(v) and v >= 0)
NUMBER = Kind("a number", lambda v: _int(v) or isinstance(v, float))
TEXT = Kind("a string", lambda v: isinstance(v, str))
TEXTS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
TEXT_MAP = Kind("a mapping of strings to strings", lambda v: isinstance(v, dict) and TEXTS.test([*v, *v.values()]))
COUNTS = Kind("a list of integers >= 0", lambda v: isinstance(v, list | tuple) and all(COUNT.test(x) for x in v))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
REQUIRED = object()  # `require`'s default: the field must be present


def require(fields: Any, key: str, where: Path | str, kind: Kind = ANY, default: Any = REQUIRED) -> Any:
    """`fields[key]`, checked to be of `kind`; `default` where it is absent or null (else the field is needed)."""
    if not isinstance(fields, dict):
        raise UserError(f"{where}: expected a mapping of fields, got {type(fields).__name__}")
    value = fields.get(key)
    if value is None and default is not REQUIRED:
        return default
    if value is None:
        raise UserError(f"{where}: {key} is missing; it is needed to convert the model")
    if not kind.test(value):
        raise UserError(f"{where}: {key} is {_short(value)}; expected {kind.what}")
    return value


def check(value: Any, kind: Kind, where: Path | str, name: str) -> Any:
    """`value` (named `name` in the message) if it is of `kind`."""
    return require({name: value}, name, where, kind)


def read_json(path: Path, what: str) -> Any:
    """A JSON file's values; unreadable, not UTF-8 or not JSON is one line naming the file."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the {what} is not valid JSON ({e})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
