"""Fill the `{{field}}`s of a launch template: a syntax that leaves shell `$VAR` and `${VAR}` alone,
so a template stays a readable shell script that a cluster user can edit."""

from __future__ import annotations

import re
from pathlib import Path

from megatronlite import config
from megatronlite.errors import UserError

FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(template: Path, values: dict[str, str]) -> str:
    """The template's text with every field replaced; a field without a value is a UserError."""
    if not template.is_file():
        raise UserError(f"launch template not found: {template}")
    text = config.read_text(template, "launch template")
    unknown = sorted({m.group(1) for m in FIELD.finditer(text)} - values.keys())
    if unknown:
        raise UserError(
            f"{template}: unknown template field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(values))}"
        )
    return FIELD.sub(lambda m: values[m.group(1)], text)
