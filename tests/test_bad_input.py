"""Bad input that once ended in a traceback or was silently accepted: each is one line, exit 2, naming the key,
flag or file and what would be valid."""

import pytest
import torch
from helpers import error_of, set_args, tiny_overrides
from test_python_api import random_checkpoint

from megatronlite import config
from megatronlite.errors import UserError


def train_error(capsys, run, sets, *extra: str) -> str:
    return error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(run), *extra, *set_args(sets))


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, corpus, capsys):
    (tmp_path / "afile").write_text("x")
    sets = tiny_overrides(corpus, tmp_path / "run", **{"data.cache_dir": str(tmp_path / "afile")})
    line = train_error(capsys, tmp_path / "run", sets, "--dry-run")
    assert f"data.cache_dir {tmp_path / 'afile'}: cannot make the directory" in line


@pytest.mark.parametrize(
    "extra, dry",
    [
        ({"model.vocab_size": 2**40}, False),  # 256 TiB of embedding on the host: the allocator refuses
        ({"model.hidden_size": 2**40, "model.num_heads": 1, "model.num_kv_heads": 1}, True),  # past a size: even meta
    ],
    ids=["vocab", "hidden"],
)
def test_a_model_too_large_to_allocate_is_named(tmp_path, corpus, capsys, extra, dry):
    sets = tiny_overrides(corpus, tmp_path / "run", **extra)
    line = train_error(capsys, tmp_path / "run", sets, *(["--dry-run"] if dry else []))
    assert "the model cannot be allocated: " in line and "GiB of cpu memory" in line, line
    assert f"{next(iter(extra))} {2**40}" in line


def test_only_allocation_failures_become_the_models_size():
    from megatronlite.parallel.stages import model_allocation

    cfg = config.Config()
    with pytest.raises(UserError, match=r"the model cannot be allocated: [\d,]+ parameters"):
        with model_allocation(cfg, torch.device("cpu")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="something else"):
        with model_allocation(cfg, torch.device("cpu")):
            raise RuntimeError("something else")


def test_dry_run_workers_below_one_is_refused(tmp_path, corpus, capsys):
    """`--workers 0` was read as unset: a dry run of one worker."""
    line = train_error(
        capsys, tmp_path / "run", tiny_overrides(corpus, tmp_path / "run"), "--dry-run", "--workers", "0"
    )
    assert "--workers must be a positive number of workers, got 0" in line


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-new-tokens", "-5", "--max-new-tokens = -5; valid: an integer >= 1"),
        ("--max-new-tokens", "0", "--max-new-tokens = 0; valid: an integer >= 1"),
        ("--temperature", "-1", "--temperature = -1.0; valid: a finite number >= 0 (0: greedy)"),
        ("--temperature", "nan", "--temperature = nan; valid: a finite number >= 0"),
        ("--temperature", "inf", "--temperature = inf; valid: a finite number >= 0"),
        ("--top-k", "-3", "--top-k = -3; valid: an integer >= 0 (0: sample from all tokens)"),
    ],
)
def test_generate_sampling_flags_are_checked(tmp_path, capsys, flag, value, message):
    random_checkpoint(tmp_path / "run", "llama")
    line = error_of(capsys, "generate", str(tmp_path / "run"), "--prompt", "x", "--temperature", "1", flag, value)
    assert f"generate: {message}" in line
