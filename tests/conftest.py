import json
from pathlib import Path

import pytest

from megatronlite.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small real-text corpus (this repository's Python sources), byte-tokenized: its prefix."""
    out = tmp_path_factory.mktemp("corpus")
    docs = out / "docs.jsonl"
    with open(docs, "w") as f:
        for path in sorted((REPO / "megatronlite").rglob("*.py")):
            f.write(json.dumps({"text": path.read_text()}) + "\n")
    return preprocess([str(docs)], str(out / "code"), append_eod=True, progress=False)[0]
