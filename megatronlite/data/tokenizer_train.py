"""`megatronlite tokenizer train`: a byte-level BPE tokenizer learned locally from the user's own text.

Byte-level (GPT-2 style) so every input is encodable; `<|endoftext|>` is the end-of-document token that
`build_tokenizer` looks for. The result is DIR/tokenizer.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatronlite.data.readers import add_input_arguments, expand_inputs, iter_documents
from megatronlite.errors import UserError
from megatronlite.extras import require

EOD = "<|endoftext|>"


def train_tokenizer(inputs: list[str], vocab_size: int, output_dir: str, json_key: str = "text") -> Path:
    """Learn a byte-level BPE of `vocab_size` tokens from `inputs`; return the tokenizer.json written."""
    tk = require("tokenizers", "hf", "tokenizer train")
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise UserError(f"--vocab-size {vocab_size}: must exceed {len(alphabet) + 1} (256 bytes and {EOD})")
    expand_inputs(inputs)
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(iter_documents(inputs, json_key), trainer=trainer)
    out = Path(output_dir) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tokenizer.json.tmp")
    tokenizer.save(str(tmp))
    tmp.replace(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    parser.add_argument("--output", required=True, metavar="DIR", help="writes DIR/tokenizer.json")


def main(args: argparse.Namespace) -> None:
    path = train_tokenizer(args.input, args.vocab_size, args.output, json_key=args.json_key)
    print(f"wrote {path}")
