"""A model converted from HF continues pretraining with `train` (`checkpoint.load` = the converted run)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import train_job  # noqa: E402

from megatronlite import load_model  # noqa: E402
from megatronlite.convert import Options, convert  # noqa: E402

STEPS = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A tiny byte-tokenized corpus made with `megatronlite preprocess`."""
    out = tmp_path_factory.mktemp("data")
    words = "the cat sat on a mat while the dog ran to the red barn and back again".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) + f" {i}." for i in range(200)]
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cmd = [
        sys.executable,
        "-m",
        "megatronlite",
        "preprocess",
        "--input",
        str(out / "docs.jsonl"),
        "--output-prefix",
        str(out / "text"),
        "--tokenizer",
        "byte",
        "--append-eod",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return str(out / "text")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=257,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out / "hf")
    convert("hf", "mlite", out / "hf", out / "run", Options())
    return out / "run"


def train(nproc: int, converted: Path, run: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    """`megatronlite train` of the converted run's config in `nproc` workers, starting from its checkpoint."""
    sets = [
        f"checkpoint.load={converted}",
        f"data.sources=[{{path: {data}}}]",
        f"data.cache_dir={run.parent / 'cache'}",
        f"train.steps={STEPS}",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        "optim.lr=3.0e-3",
        "optim.warmup_steps=2",
        "logging.interval=1",
        *extra,
    ]
    return train_job(converted / "config.yaml", run, nproc, sets, timeout=280)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_learns(done: subprocess.CompletedProcess, converted: Path, run: Path) -> list[float]:
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"initialized weights from {converted}/checkpoints/step_0000000" in done.stdout
    curve = losses(run)
    assert len(curve) == STEPS and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.3  # falling
    return curve


def transformers_first_loss(hf_dir: Path, run: Path) -> float:
    """transformers' loss on the run's first batch (its micro-batches' mean token losses, averaged)."""
    from megatronlite import config
    from megatronlite.data.loader import BatchLoader
    from megatronlite.data.run import build_run_data

    cfg = config.load(run / "config.yaml")
    t = cfg.train
    batch = BatchLoader(build_run_data(cfg).train, t.micro_batch_size, t.global_batch_size, 0, 1).batch_at(0)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
            for tokens in batch
        ]
    return torch.stack(losses).mean().item()


@pytest.mark.slow
def test_converted_model_trains_in_one_process(tmp_path, converted, data):
    run = tmp_path / "run"
    curve = assert_learns(train(1, converted, run, data), converted, run)
    # the weights reached the parameters: step 1's loss is transformers' loss on the same batch
    assert curve[0] == pytest.approx(transformers_first_loss(converted.parent / "hf", run), rel=1e-5)
    # the run's saved config names the checkpoint it started from: the run stays loadable without it
    moved = converted.with_name("moved")
    converted.rename(moved)
    try:
        assert load_model(run).run_config.checkpoint.load == str(converted)
    finally:
        moved.rename(converted)


@pytest.mark.slow
def test_converted_model_trains_at_tp2_pp2(tmp_path, converted, data):
    """The same start in 4 gloo processes, TP 2 x PP 2: the converted weights load into any layout."""
    one = tmp_path / "one"
    reference = assert_learns(train(1, converted, one, data), converted, one)
    run = tmp_path / "tp2pp2"
    done = train(4, converted, run, data, "parallel.tensor=2", "parallel.pipeline=2")
    assert assert_learns(done, converted, run) == pytest.approx(reference, rel=1e-4)  # the same run, sharded
