"""The fenced code blocks of a Markdown file, and exact text substitutions that must each match once."""

import re
from dataclasses import dataclass

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence

    @property
    def key(self) -> str:
        """The block's name: its first line without a trailing comment or continuation."""
        return self.text.splitlines()[0].split("  #")[0].rstrip(" \\")


def blocks(markdown: str, langs: tuple[str, ...]) -> list[Block]:
    """The blocks fenced as one of `langs`, in order."""
    found = []
    for m in FENCE.finditer(markdown):
        if m.group(1) in langs:
            found.append(Block(m.group(1), m.group(2), markdown.count("\n", 0, m.start()) + 1))
    return found


def substitute(text: str, subs: tuple[tuple[str, str], ...]) -> str:
    """`text` with each (old, new) replaced; an `old` that does not occur exactly once is an error."""
    for old, new in subs:
        if text.count(old) != 1:
            raise AssertionError(f"substitution {old!r} matches {text.count(old)} times (not once) in:\n{text}")
        text = text.replace(old, new)
    return text
