import json
import sysconfig
from pathlib import Path

import pytest

from megatronlite.data.preprocess import preprocess


def stdlib_texts(count: int = 100, chars: int = 5000) -> list[str]:
    """The first `chars` characters of `count` of the standard library's modules: real text that does not change
    when this repository's code does (a corpus of our own sources moved every test's numbers on every edit)."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:count]
    return [path.read_bytes().decode("utf-8", errors="replace")[:chars] for path in paths]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small real-text corpus (Python sources of the standard library), byte-tokenized: its prefix."""
    out = tmp_path_factory.mktemp("corpus")
    docs = out / "docs.jsonl"
    with open(docs, "w") as f:
        for text in stdlib_texts():
            f.write(json.dumps({"text": text}) + "\n")
    return preprocess([str(docs)], str(out / "code"), append_eod=True, progress=False)[0]


@pytest.fixture(scope="session")
def short_docs(tmp_path_factory) -> str:
    """A corpus of short documents (lines of the standard library's sources, 20 to 60 bytes), so a 64-token
    sample packs several and crosses end-of-document tokens: what document masking acts on."""
    out = tmp_path_factory.mktemp("short_docs")
    docs = out / "docs.jsonl"
    with open(docs, "w") as f:
        for text in stdlib_texts():
            for line in text.splitlines():
                if 20 <= len(line.strip()) <= 60:
                    f.write(json.dumps({"text": line.strip()}) + "\n")
    return preprocess([str(docs)], str(out / "lines"), append_eod=True, progress=False)[0]
