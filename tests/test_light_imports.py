"""Commands start without torch: `--help`, argument errors and spawned preprocess workers import only what they use.

Measured, not timed: a test asserts that torch is not imported (wall-clock limits are for benchmarks).
"""

import subprocess
import sys

import pytest

COMMANDS = ("train", "launch", "submit", "sweep", "preprocess", "tokenizer", "data", "generate", "convert", "config")


def imported(*args: str) -> set[str]:
    """The modules `python -X importtime ARGS` imported (-X importtime lists every module a process imports)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    return {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "megatronlite", "--help"],
        ["-m", "megatronlite", "no-such-command"],
        # what a spawned `preprocess --workers N` process imports before its first task
        ["-c", "import megatronlite.data.preprocess"],
        *(["-m", "megatronlite", name, "--help"] for name in COMMANDS),
        ["-m", "megatronlite", "launch", "configs/demo.yaml"],  # an argument error: --nproc-per-node missing
    ],
    ids=lambda args: " ".join(args[-2:]),
)
def test_no_torch_before_a_command_runs(args):
    assert "torch" not in imported(*args)


def test_only_pipelined_runs_import_torchs_pipelining():
    """It adds about half a second to every worker's start; the trainer imports the schedules when pp > 1."""
    trainer = imported("-c", "import megatronlite.train.trainer")
    assert "megatronlite.parallel.stages" in trainer
    assert not {"torch.distributed.pipelining", "megatronlite.parallel.pipeline"} & trainer


def test_convert_choices_name_every_format_and_dtype():
    from megatronlite.convert import FORMATS
    from megatronlite.convert.cli import DTYPE_NAMES, FORMAT_NAMES
    from megatronlite.convert.model_state import OUTPUT_DTYPES

    assert (FORMAT_NAMES, DTYPE_NAMES) == (tuple(FORMATS), tuple(OUTPUT_DTYPES))
