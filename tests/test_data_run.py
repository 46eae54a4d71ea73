"""`megatronlite data prebuild`: builds the caches a run reads, finds them the second time, and `train` finds them."""

import re

import pytest
from helpers import set_args, tiny_overrides

from megatronlite.cli import main


def cached(cache_dir):
    """Every finished cache file and its modification time."""
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir() if p.suffix in (".npy", ".txt")}


def test_prebuild_then_train_reuse_the_caches(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.steps": 2, "checkpoint.save": False})
    options = set_args(sets)
    main(["data", "prebuild", "configs/demo.yaml", *options])
    out = capsys.readouterr().out
    assert re.search(r"train: [\d,]+ samples\n", out) and re.search(r"valid: [\d,]+ samples\n", out)
    assert f"{corpus}.bin/.idx" in out
    assert out.count("sample index built") == 2 and f"cache: {tmp_path / 'cache'}" in out
    files = cached(tmp_path / "cache")
    assert len(files) == 7  # the max-id scan and 3 index arrays for each split

    main(["data", "prebuild", "configs/demo.yaml", *options])
    assert capsys.readouterr().out.count("sample index found") == 2
    main(["train", "configs/demo.yaml", "--run-dir", str(run), *options])
    assert cached(tmp_path / "cache") == files


def test_prebuild_reports_a_bad_config_in_one_line(tmp_path, corpus, capsys):
    sets = tiny_overrides(corpus, tmp_path / "run", **{"model.vocab_size": 200})
    with pytest.raises(SystemExit) as e:
        main(["data", "prebuild", "configs/demo.yaml", *set_args(sets)])
    assert e.value.code == 2
    assert "model.vocab_size (200) is smaller than the tokenizer's vocabulary (257" in capsys.readouterr().err


def test_the_splits_are_asked_for_megatrons_sample_counts():
    """Megatron-LM's get_train_valid_test_num_samples: train_iters x global batch for train, and
    (train_iters // eval_interval + 1) x eval_iters x global batch for valid, so a small valid split holds the
    epochs (and so the order) Megatron's does."""
    from megatronlite.config import Config, TrainConfig
    from megatronlite.data.run import num_samples

    train = dict(steps=100, global_batch_size=8, eval_iters=2)
    assert num_samples(Config(train=TrainConfig(**train, eval_interval=10))) == (800, 176)
    assert num_samples(Config(train=TrainConfig(**train, eval_interval=0))) == (800, 0)  # never evaluated


def test_a_run_that_never_evaluates_needs_no_validation_split(tmp_path, corpus, capsys):
    """Split "100,0": Megatron builds no validation set when none is asked for; one that evaluates is told why."""
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"data.split": "100,0", "train.steps": 2, "train.eval_interval": 0})
    main(["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(sets)])
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    sets = tiny_overrides(corpus, run, **{"data.split": "100,0", "train.steps": 4, "train.eval_interval": 2})
    with pytest.raises(SystemExit) as refused:
        main(["train", "configs/demo.yaml", "--run-dir", str(tmp_path / "evaluated"), *set_args(sets)])
    assert refused.value.code == 2
    assert "gives the valid split none of the" in capsys.readouterr().err
