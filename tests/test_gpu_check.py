"""`make gpu-check GPU_DRY_RUN=1` (bench/gpu_check.py --dry-run): the GPU check's steps on CPU at tiny sizes.

GPU machines are lent rarely and briefly; this keeps the kit from rotting in between: every step must
run (or be skipped for a stated reason) and the report must hold each step's row and results. The one
peer the dry run skips, megatron-core (its layers ask CUDA), is built and run here behind the CPU shims
of the megatron-core conversion tests.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import workers

REPO = Path(__file__).resolve().parents[1]
STEPS = ["pytest -m gpu", "train 1B", "kernels", "train 125M", "checkpoint save/load"]


@pytest.mark.slow
def test_dry_run_reports_every_step_ok_or_skipped(tmp_path):
    cmd = [sys.executable, "bench/gpu_check.py", "--dry-run", "--results", str(tmp_path), "--work", str(tmp_path / "w")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    [report_file] = tmp_path.glob("gpu_check_*-dry-run_*.md")
    report = report_file.read_text()
    table = report.split("\n## ")[0]  # the steps' table, before the sections with the benches' own tables
    statuses = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| [\d.]* \| ", table, re.MULTILINE))
    assert list(statuses) == STEPS, report
    failed = {step: status for step, status in statuses.items() if status not in ("ok", "skipped")}
    assert not failed, f"{failed}\n{report[-6000:]}"
    assert done.returncode == 0, done.stdout[-3000:]
    assert "- GPU: none (no CUDA device)" in report
    for row in (
        "| megatronlite |",
        "| megatronlite (torch.compile) |",
        "| HF LlamaForCausalLM (sdpa) |",
        "| rms_norm |",
    ):
        assert row in report, row
    assert re.search(r"save \(synchronous, committed\): [\d.]+ s", report), report


MCORE_VOCAB, MCORE_SEQ = 256, 32
MCORE_TINY = [  # the presets' features (GQA, tied or untied embeddings) at a CPU size
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    f"model.vocab_size={MCORE_VOCAB}",
    f"train.seq_len={MCORE_SEQ}",
]


def _megatron_core_peer(out: str) -> None:
    """A worker (the shims patch torch and megatron-core for the process's life): bench_train's megatron-core
    model of each GPU-check preset, its parameter count beside megatronlite's, one loss and backward."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from test_convert_megatron import _cpu_shims

    from megatronlite import config
    from megatronlite.models.gpt import GPTModel

    sys.path.insert(0, str(REPO / "bench"))
    import bench_train

    _cpu_shims()
    tensor_parallel.model_parallel_cuda_manual_seed = lambda *a, **k: None  # seeds CUDA's RNG tracker
    dist.init_process_group("gloo")
    results = {}
    for preset in ("llama-1b", "llama-125m"):
        cfg = config.load(REPO / "configs" / "models" / f"{preset}.yaml", MCORE_TINY)
        model = bench_train.mcore_model(cfg, torch.device("cpu"))
        tokens = torch.randint(0, MCORE_VOCAB, (2, MCORE_SEQ + 1), generator=torch.Generator().manual_seed(0))
        loss = bench_train.mcore_loss(model, tokens, torch.arange(MCORE_SEQ)[None])
        loss.backward()
        with torch.device("meta"):
            ours = GPTModel(cfg.model)
        results[preset] = {
            "loss": loss.item(),
            "params": {name: list(p.shape) for name, p in model.named_parameters()},
            "no_grad": [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()],
            "our_count": sum(p.numel() for p in ours.parameters()),
        }
    Path(out).write_text(json.dumps(results))


@pytest.mark.slow
def test_megatron_core_peer_is_the_same_model_and_trains(tmp_path):
    """bench_train's megatron-core row must time the model megatronlite's rows time: as many parameters (tied
    embeddings in the 1B preset, GQA), a loss at init near ln(vocab), a gradient for every parameter."""
    pytest.importorskip("megatron.core")
    workers(_megatron_core_peer, 1, str(tmp_path / "peer.json"))
    results = json.loads((tmp_path / "peer.json").read_text())
    for preset, r in results.items():
        count = sum(math.prod(shape) for shape in r["params"].values())
        assert count == r["our_count"], (preset, r["params"])
        assert r["loss"] == pytest.approx(math.log(MCORE_VOCAB), abs=0.1), preset
        assert not r["no_grad"], preset
    tied = {preset: "output_layer.weight" not in r["params"] for preset, r in results.items()}
    assert tied == {"llama-1b": True, "llama-125m": False}
