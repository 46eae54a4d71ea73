"""The data a training run reads, from its config alone; and `megatronlite data prebuild`, which builds it ahead.

`build_run_data` is the one place that turns a config into build_datasets arguments, so caches prebuilt
offline (say on a login node, before the job starts) are exactly the ones every rank of `train` looks for.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatronlite.config import Config, load
from megatronlite.data import cache
from megatronlite.data.blending import BlendedDataset
from megatronlite.data.dataset import Dataset, GPTDataset, build_datasets
from megatronlite.data.tokenizers import Tokenizer, build_tokenizer
from megatronlite.errors import UserError


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: Dataset
    valid: Dataset


def num_samples(cfg: Config) -> tuple[int, int]:
    """(train, valid) samples a run asks its splits for, as Megatron-LM's get_train_valid_test_num_samples does:
    every step's global batch, and (steps // eval_interval + 1) evaluations' batches, so a split holds the same
    epochs, in the same order, as Megatron's. (Every evaluation here reads the first of them: one fixed set, so
    that evaluations compare; Megatron's go on through the split.) A run that never evaluates asks for none: its
    split may be empty ("100,0")."""
    t = cfg.train
    evaluations = t.steps // t.eval_interval + 1 if t.eval_interval else 0
    return t.steps * t.global_batch_size, evaluations * max(1, t.eval_iters) * t.global_batch_size


def build_run_data(cfg: Config) -> RunData:
    """The tokenizer and (train, valid) datasets of `cfg`, their caches built on first use."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, data.tokenizer = {cfg.data.tokenizer})"
        )
    train, valid = build_datasets(
        cfg.data.sources,
        tokenizer,
        seq_len=cfg.train.seq_len,
        seed=cfg.train.seed,
        split=cfg.data.split,
        num_samples=num_samples(cfg),
        cache_dir=str(cache.directory(cfg.data.cache_dir)),
        vocab_size=cfg.model.vocab_size,
    )
    return RunData(tokenizer, train, valid)


def _parts(dataset: Dataset) -> list[GPTDataset]:
    if isinstance(dataset, BlendedDataset):
        return dataset.datasets
    return [dataset] if isinstance(dataset, GPTDataset) else []


def _index_name(part: GPTDataset) -> str:
    return part.cache_files[0].name.rsplit("-", 1)[0]


def sample_order(dataset: Dataset) -> list[str]:
    """What fixes the order of `dataset`'s samples, from the first: its sources' sample indexes (by cache name).
    They change when a run asks a source for another number of epochs (train.steps or the global batch changed),
    and so does the order of every sample, as in megatron-core; a blend's interleave depends on its weights alone,
    named too."""
    weights = (
        [f"blend weights {','.join(f'{w:.6g}' for w in dataset.weights)}"]
        if isinstance(dataset, BlendedDataset)
        else []
    )
    return [_index_name(part) for part in _parts(dataset)] + weights


def describe(data: RunData) -> list[str]:
    """What a run will read, and for each sample index whether it was built now or found in the cache."""
    lines = []
    for name, dataset in (("train", data.train), ("valid", data.valid)):
        lines.append(f"{name}: {len(dataset):,} samples")
        for part in _parts(dataset):
            state = "built" if part.built else "found"
            tokens = int(part.indexed.sizes.sum(dtype="int64"))
            source = f"{part.indexed.prefix}.bin/.idx: {part.indexed.num_documents:,} documents, {tokens:,} tokens"
            lines.append(f"  {source}")
            where = f"{part.cache_files[0].parent}/{_index_name(part)}-{{doc,sample,shuffle}}.npy"
            lines.append(f"    {len(part):,} samples, sample index {state}: {where}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML)")


def main(args: argparse.Namespace) -> None:
    cfg = load(args.config, args.set)
    data = build_run_data(cfg)
    print("\n".join(describe(data)))
    print(f"cache: {cache.directory(cfg.data.cache_dir)}")
