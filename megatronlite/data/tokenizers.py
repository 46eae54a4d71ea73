"""Tokenizers behind one small protocol: a byte-level one that needs no files, and any local HF tokenizer.json.

`name` is a stable identifier that changes whenever the token ids would, so cached token files are keyed
by it. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from megatronlite.errors import UserError
from megatronlite.extras import require

EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str, dtype: np.dtype) -> np.ndarray:
        """`encode` as a numpy array: what preprocessing writes, made without a Python int per token where possible."""
        ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255 and 256 ends a document: any text, no vocabulary file."""

    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json read from disk; its end-of-document token must be one of EOD_TOKENS."""

    def __init__(self, path: Path) -> None:
        tokenizers = require("tokenizers", "hf", f"the tokenizer {path}")
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable tokenizer.json ({e})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = next((t for t in EOD_TOKENS if t in vocab), None)
        if eod is None:
            raise UserError(f"{path}: no end-of-document token; the vocabulary needs one of {', '.join(EOD_TOKENS)}")
        self.eod_id = vocab[eod]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = "hf:" + hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str, dtype: np.dtype) -> np.ndarray:
        return np.array(self.encode(text), dtype=dtype)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(spec: str) -> Tokenizer:
    """'byte', or a path to a tokenizer.json or to a directory holding one."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer {spec!r}: not found; use 'byte' or a path to a tokenizer.json (or its directory)")
    return HFTokenizer(path)
