"""A plain install, as a user gets it: the wheel built from this tree, installed into a fresh venv beside torch
and nothing else (no extras, no checkout on the path), run from a directory outside the checkout.

torch is installed for real (from pip's cache after `make install`, about 20 s) rather than borrowed from
.venv: a .pth into .venv's site-packages would also expose the dev extras (matplotlib, safetensors, ...),
hiding both a missing-extra crash and a core dependency pyproject.toml forgot to declare.
"""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from helpers import set_args, tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The fresh venv's bin/ directory, with megatronlite installed from its wheel."""
    tmp = tmp_path_factory.mktemp("plain")
    src = tmp / "src"  # build from a copy: setuptools leaves build/ and *.egg-info/ beside the sources
    shutil.copytree(REPO / "megatronlite", src / "megatronlite", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "wheel", src], check=True)
    [wheel] = (tmp / "wheel").glob("megatronlite-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    subprocess.run([python, *pip, str(wheel), torch_pin], check=True, timeout=240)  # the error names pip
    return python.parent


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Path:
    """A working directory outside the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def mlite(plain: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`megatronlite ARGS` of the plain install in the current directory, with no PYTHONPATH into the checkout."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run(
        [str(plain / "megatronlite"), *args], capture_output=True, text=True, timeout=300, env=environ
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_the_installed_package_is_used(plain, outside):
    code = "import megatronlite; print(megatronlite.__file__)"
    done = subprocess.run([plain / "python", "-c", code], capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()).is_relative_to(plain.parent), done.stdout


def test_submit_and_sweep_dry_runs(plain, outside):
    done = mlite(plain, "submit", DEMO, "--nodes", "1", "--nproc-per-node", "2", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=1" in done.stdout and "free_port() {" in done.stdout  # the template and its helpers
    sweep = str(REPO / "configs" / "sweeps" / "demo-lr.yaml")
    done = mlite(plain, "sweep", sweep, "--executor", "slurm", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --array=0-5%1" in done.stdout and "run_preemptible" in done.stdout
    done = mlite(plain, "submit", "--print-template", "srun")
    assert done.returncode == 0 and "{{helpers}}" in done.stdout, done.stderr


def test_train_then_convert(plain, outside):
    run = outside / "run"
    sets = tiny_overrides("builtin:stdlib", run, **{"train.steps": 2, "checkpoint.interval": 2, "data.split": "90,10"})
    done = mlite(plain, "train", DEMO, "--run-dir", str(run), *set_args(sets), MEGATRONLITE_STDLIB_MAX_BYTES="1000000")
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert mlite(plain, "convert", "--help").returncode == 0
    done = mlite(plain, "convert", "--from", "mlite", "--to", "torch", str(run), "model.pt")
    assert done.returncode == 0, done.stderr
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    hf |= {"intermediate_size": 128, "vocab_size": 257, "max_position_embeddings": 64}
    (outside / "hf").mkdir()
    (outside / "hf" / "config.json").write_text(json.dumps(hf))
    line = one_line_error(mlite(plain, "convert", "--from", "hf", "--to", "mlite", "hf", "back"))
    assert line == "megatronlite: error: convert --from hf needs safetensors: pip install 'megatronlite[hf]'"


def test_local_sweep_without_matplotlib(plain, outside):
    (outside / "sweep.yaml").write_text(f"name: s\nbase: {DEMO}\ngrid: {{optim.lr: [1.0e-3]}}\n")
    line = one_line_error(mlite(plain, "sweep", "sweep.yaml", "--out", "out"))
    assert (
        line
        == "megatronlite: error: a sweep's loss plot (loss.png) needs matplotlib: pip install 'megatronlite[sweep]'"
    )
    assert not (outside / "out").exists()
