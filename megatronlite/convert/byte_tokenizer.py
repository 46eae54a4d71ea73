"""The byte tokenizer as HF tokenizer files, so an exported byte-level model has a tokenizer beside it.

megatronlite's byte tokenizer needs no files (data/tokenizers.py: byte b is token b, 256 ends a document),
so a model trained with it would reach transformers with none. This writes the same tokenizer as a
`tokenizers` byte-level BPE with no merges: every byte is one token whose id is the byte's value, and
`<|endoftext|>` is 256. `AutoTokenizer.from_pretrained(dir)` loads it, and megatronlite reads the same
tokenizer.json back (its end-of-document token is one of EOD_TOKENS). One difference: like every HF
tokenizer, it reads the text `<|endoftext|>` as the special token, where the byte tokenizer sees 13 bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatronlite.data.tokenizers import ByteTokenizer
from megatronlite.extras import require

EOD = "<|endoftext|>"


def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable bytes stand for themselves, the rest shift past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def write_hf_files(directory: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json of the byte tokenizer, into `directory`."""
    tk = require("tokenizers", "hf", "convert --to hf (the byte tokenizer's tokenizer.json)")

    vocab = {char: b for b, char in byte_to_char().items()}
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.add_special_tokens([tk.AddedToken(EOD, special=True, normalized=False)])
    assert tokenizer.token_to_id(EOD) == ByteTokenizer.eod_id
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decoding gives the bytes back, spaces as they were
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
