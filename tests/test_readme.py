"""The README is true: its copy of the demo config matches the file, and its commands run.

README blocks run in CI. Every ```bash and ```python block of README.md is read from the README when the
tests run and executed for real (bash -e, then the venv's python), in README order, in one temporary
directory that stands for a user's checkout with `.venv` activated:

- `configs/` is copied there, with TINY_CONFIGS shrunk by TINY (a 2-layer model, 2 steps, a small corpus),
  so `configs/demo.yaml` runs are the README's commands on a tiny model;
- the files the README assumes a user has are made at the README's own paths (`checkout` below: a random
  HF Llama at path/to/Llama-3.2-1B, configs/my-run.yaml, corpus/, path/to/tokenizer.json);
- what still cannot run as written is changed by the exact text substitutions of PLANS, each with its reason.
  Each substitution must match its block exactly once, and a block missing from PLANS fails the test, so
  neither a new block nor the table can drift from the README;
- blocks that submit to Slurm run against the test cluster (.ci/slurm_up.sh) and are skipped without it.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import free_port
from readme_blocks import Block, blocks, substitute
from test_slurm import slurm, slurm_up  # noqa: F401 (fixtures: skip, saying why, without a Slurm that takes jobs)

from megatronlite.config import ParallelConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RUNNABLE = blocks(README, ("bash", "python"))

TINY_CONFIGS = ("demo.yaml", "models/llama-8b.yaml")
TINY = {
    "model.num_layers": 2,
    "model.hidden_size": 64,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.ffn_hidden_size": 128,
    "model.vocab_size": 257,
    "model.max_seq_len": 64,
    "train.seq_len": 64,
    "train.micro_batch_size": 2,
    "train.global_batch_size": 4,
    "train.steps": 2,
    "train.eval_interval": 0,
    "checkpoint.interval": 2,
    "logging.interval": 1,
    "data.tokenizer": "byte",
}
SWEEP_TINY = ["train.steps=2", "train.eval_interval=0"]  # appended to the sweep's overrides; and 1 draw a point


@dataclasses.dataclass(frozen=True)
class Plan:
    why: str  # why the block is changed (or "" when it runs as written)
    subs: tuple[tuple[str, str], ...] = ()
    slurm: bool = False  # submits to Slurm: runs only against a cluster that takes jobs


MAKE_DEMO = 'make -f "$REPO/Makefile" VENV="$VENV" -o "$VENV/.package" demo'
PLANS = {
    "make demo": Plan(
        "`make demo` runs its recipe for real, from this checkout's Makefile, with this venv taken as installed "
        "(-o: no pip). `make test` is not run here (it would recurse): it is what CI runs, so the block checks that.",
        (("make demo", MAKE_DEMO), ("make test", "grep -qx 'make test' \"$REPO/.ci/run\"")),
    ),
    "megatronlite train configs/demo.yaml": Plan(
        "Fewer workers on 2 CPUs, DP 1 (TP 2 x PP 2 on 4, CP 2 on 2), at free ports rather than 29500.",
        (
            ("--nproc-per-node 4", '--nproc-per-node 2 --master-port "$PORT2"'),
            ("--nproc-per-node 8", '--nproc-per-node 4 --master-port "$PORT"'),
        ),
    ),
    "import megatronlite": Plan(""),
    "megatronlite submit configs/models/llama-8b.yaml --nodes 4 --nproc-per-node 8": Plan(
        "The test cluster is one node with 2 CPUs and no GPUs and its partition has another name; the container "
        "image needs pyxis (not installed there), so that submission is only rendered (--dry-run), of the demo with "
        "a global batch 16 workers can share in place of the placeholder CONFIG.",
        (
            ("--nodes 4 --nproc-per-node 8", "--nodes 1 --nproc-per-node 4 --gpus-per-node 0"),
            ("--partition gpu", '--partition "$PARTITION"'),
            ("parallel.tensor=8", "parallel.tensor=2"),
            ("--container-image nvcr.io", "--dry-run --container-image nvcr.io"),
            ("submit CONFIG", "submit configs/demo.yaml --set train.global_batch_size=128"),
        ),
        slurm=True,
    ),
    "megatronlite sweep configs/sweeps/demo-lr.yaml --dry-run": Plan(
        "The job array runs its trials in a directory of its own (the local sweep above finished every trial in "
        "the default one), on the test cluster's CPUs and partition, and is waited for.",
        (
            (
                "--executor slurm",
                '--executor slurm --out runs/sweeps/on-slurm --wait --gpus-per-node 0 --partition "$PARTITION"',
            ),
        ),
        slurm=True,
    ),
    "megatronlite convert --from hf --to mlite path/to/Llama-3.2-1B runs/llama1b --verify": Plan(
        "/ckpts is outside the test's directory: the Megatron checkpoint is made in ckpts/ (torch_dist, written "
        "by our converter, whose files tests/test_convert_megatron.py loads with megatron-core).",
        (("/ckpts/megatron-run", "ckpts/megatron-run"),),
    ),
    "megatronlite plan configs/models/llama-8b.yaml --gpus 64 --gpu h100 --seq-len 8192 "
    "--global-batch 512 --top 5": Plan(
        "The preset is shrunk to the tiny model, whose positions stop at 64.", (("--seq-len 8192", "--seq-len 64"),)
    ),
    "megatronlite preprocess --input 'corpus/*.jsonl.zst' --output-prefix data/web": Plan(
        "2 tokenizing workers rather than 8 (2 CPUs).",
        (("--workers 8", "--workers 2"),),
    ),
}


def _shrink(path: Path, changes: dict) -> None:
    """Set the dotted keys of `changes` in the YAML file at `path`."""
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _hf_llama(path: Path) -> None:
    """A random HF Llama with TINY's shapes (so configs/my-run.yaml can continue it)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=TINY["model.hidden_size"],
        num_hidden_layers=TINY["model.num_layers"],
        num_attention_heads=TINY["model.num_heads"],
        num_key_value_heads=TINY["model.num_kv_heads"],
        intermediate_size=TINY["model.ffn_hidden_size"],
        vocab_size=TINY["model.vocab_size"],
        max_position_embeddings=TINY["model.max_seq_len"],
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _megatron_checkpoint(path: Path, hf: Path) -> None:
    """The HF Llama, in Megatron's torch_dist format."""
    from megatronlite.convert import Options, convert

    convert("hf", "megatron", hf, path, Options())


def _text_files(corpus: Path) -> None:
    """corpus/docs.jsonl and its .zst: documents of this repository's Python sources."""
    import zstandard

    lines = [json.dumps({"text": p.read_text()}) for p in sorted((REPO / "megatronlite" / "data").glob("*.py"))]
    data = ("\n".join(lines) + "\n").encode()
    corpus.mkdir()
    (corpus / "docs.jsonl").write_bytes(data)
    (corpus / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))


def _bpe_tokenizer(path: Path, corpus: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train([str(corpus / "docs.jsonl")], trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, corpus) -> Path:
    """The user's checkout the README's blocks run in (see the top of this file)."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "configs", root / "configs")
    tiny = {**TINY, "data.sources": [{"path": corpus}], "data.cache_dir": str(root / "cache")}
    for name in TINY_CONFIGS:
        _shrink(root / "configs" / name, tiny)
    sweep = root / "configs" / "sweeps" / "demo-lr.yaml"
    _shrink(sweep, {"overrides": yaml.safe_load(sweep.read_text())["overrides"] + SWEEP_TINY, "trials": 1})
    shutil.copy(root / "configs" / "demo.yaml", root / "configs" / "my-run.yaml")
    _shrink(root / "configs" / "my-run.yaml", {"name": "my-run"})
    _hf_llama(root / "path" / "to" / "Llama-3.2-1B")
    _megatron_checkpoint(root / "ckpts" / "megatron-run", root / "path" / "to" / "Llama-3.2-1B")
    _text_files(root / "corpus")
    _bpe_tokenizer(root / "path" / "to" / "tokenizer.json", root / "corpus")
    return root


def _partition() -> str:
    """The test cluster's default partition."""
    out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, check=True)
    return next(p for p in out.stdout.split() if p.endswith("*")).rstrip("*")


def _run(block: Block, text: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if block.lang == "python":
        script = cwd / f"readme_line_{block.line}.py"
        script.write_text(text)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-x", "-c", text]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_the_config_tour_is_the_demo_config_plus_the_parallel_defaults():
    start = README.index("```yaml\nname: demo") + len("```yaml\n")
    tour = yaml.safe_load(README[start : README.index("```", start)])
    parallel = tour.pop("parallel")
    assert tour == yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    defaults = dataclasses.asdict(ParallelConfig())
    assert parallel == {key: defaults[key] for key in parallel}


def test_every_block_has_a_plan_and_every_substitution_matches():
    keys = [b.key for b in RUNNABLE]
    assert sorted(keys) == sorted(PLANS), "README blocks and PLANS differ: give a new block its Plan"
    for block in RUNNABLE:
        substitute(block.text, PLANS[block.key].subs)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.key[:60] for b in RUNNABLE])
def test_readme_block_runs(block, checkout, request):
    """One block, after the blocks above it (they share `checkout`, as a user's commands share a directory)."""
    plan = PLANS.get(block.key)
    assert plan is not None, f"README.md line {block.line}: a block with no Plan in tests/test_readme.py"
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "REPO": str(REPO),
        "VENV": sys.prefix,
        "XDG_CACHE_HOME": str(checkout / "cache"),
        "PORT": str(free_port()),
        "PORT2": str(free_port()),
    }
    if plan.slurm:
        request.getfixturevalue("slurm")
        env["PARTITION"] = _partition()
    done = _run(block, substitute(block.text, plan.subs), checkout, env)
    assert done.returncode == 0, f"README.md line {block.line}:\n{done.stdout}\n{done.stderr}"
