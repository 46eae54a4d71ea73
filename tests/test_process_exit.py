"""`python -m megatronlite` (every worker) skips the interpreter's teardown after a command that succeeded, but not
its exit hooks or its buffered output; a command that failed exits the usual way, with its code."""

import subprocess
import sys

import pytest

# runs the package as `python -m megatronlite` does, in a process holding an object whose finalizer reports the
# interpreter's teardown, then registers an exit hook as a command's libraries do (wandb, logging, multiprocessing)
SCRIPT = """
import atexit, runpy, sys

class Sentinel:
    def __del__(self):
        print("teardown ran", flush=True)

sentinel = Sentinel()
sys.argv = ["megatronlite", *sys.argv[1:]]
try:
    runpy.run_module("megatronlite", run_name="__main__", alter_sys=True)
finally:
    atexit.register(print, "exit hook ran")
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, output",
    [(["doctor"], "auto picks: kernels on"), (["--help"], "usage: megatronlite")],  # returns; exits with code 0
    ids=["returned", "exit-0"],
)
def test_a_finished_command_runs_its_exit_hooks_flushes_and_skips_the_teardown(args, output):
    done = run(*args)  # stdout is a pipe: block-buffered, so an exit without a flush would lose it
    assert done.returncode == 0, done.stderr
    assert output in done.stdout
    assert "exit hook ran" in done.stdout
    assert "teardown ran" not in done.stdout


def test_a_failed_command_exits_with_its_code_and_a_normal_teardown():
    done = run("train", "no-such-config.yaml")
    assert done.returncode == 2
    assert "config file not found" in done.stderr
    assert "exit hook ran" in done.stdout and "teardown ran" in done.stdout
