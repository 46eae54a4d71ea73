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
MODELS = REPO / "configs" / "models"
# name -> (config, sets before MCORE_TINY, sets after it, the features a skip must name (any one))
MCORE_CASES = {
    "llama-1b": (MODELS / "llama-1b.yaml", [], [], ()),
    "llama-125m": (MODELS / "llama-125m.yaml", [], [], ()),
    "--family qwen3": (REPO / "configs" / "demo.yaml", "qwen3", [], ("head_dim", "qk_norm")),
    "qwen3-0.6b": (MODELS / "qwen3-0.6b.yaml", [], [], ("head_dim", "qk_norm")),
    # a window of 8 keys: after 2 layers the last of 32 positions no longer sees the first
    "--family mistral": (REPO / "configs" / "demo.yaml", "mistral", ["model.sliding_window=8"], ("sliding_window",)),
    # a vocabulary that pads (250 -> 256) on both sides
    "gpt2-small": (MODELS / "gpt2-small.yaml", [], ["model.vocab_size=250"], ("gelu", "layernorm", "learned", "bias")),
    "olmoe-1b-7b": (
        MODELS / "olmoe-1b-7b.yaml",
        [],
        ["model.moe.num_experts=8", "model.moe.ffn_hidden_size=32"],
        ("moe", "expert"),
    ),
}


def _megatron_core_peer(out: str) -> None:
    """A worker (the shims patch torch and megatron-core for the process's life): bench_train's megatron-core
    model of each case, its parameter count beside megatronlite's, one loss and backward, and whether the last
    position's logits change with the first token (they must not under a sliding window); or why it is skipped."""
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
    for name, (path, family, after, _) in MCORE_CASES.items():
        sets = (bench_train.FAMILY_SETS[family] if family else []) + MCORE_TINY + after
        cfg = config.load(path, sets)
        try:
            model = bench_train.mcore_model(cfg, torch.device("cpu"))
        except bench_train.PeerSkipped as e:
            results[name] = {"skipped": str(e)}
            continue
        tokens = torch.randint(0, cfg.model.vocab_size, (2, MCORE_SEQ + 1), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(MCORE_SEQ)[None]
        loss = bench_train.mcore_loss(model, tokens, positions)
        loss.backward()
        with torch.no_grad():
            ids = tokens[:, :-1]
            other = ids.clone()
            other[:, 0] = (ids[:, 0] + 1) % cfg.model.vocab_size
            last = [model(x, positions.expand_as(x), None)[:, -1] for x in (ids, other)]
        with torch.device("meta"):
            ours = GPTModel(cfg.model)
        results[name] = {
            "loss": loss.item(),
            "params": {n: list(p.shape) for n, p in model.named_parameters()},
            "no_grad": [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()],
            "our_count": sum(p.numel() for p in ours.parameters()),
            "last_sees_first": not torch.equal(*last),
        }
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def mcore_peers(tmp_path_factory) -> dict:
    """`_megatron_core_peer`'s results, one worker for all cases."""
    pytest.importorskip("megatron.core")
    out = tmp_path_factory.mktemp("mcore") / "peer.json"
    workers(_megatron_core_peer, 1, str(out), timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MCORE_CASES))
def test_megatron_core_peer_is_the_same_model_or_skipped(mcore_peers, case):
    """bench_train's megatron-core row must time the model megatronlite's rows time, whose FLOPs its MFU uses: as
    many parameters (head size, q/k norms, LayerNorm's biases, learned positions, tied embeddings, GQA, padded
    vocabulary), the sliding window where there is one, a loss at init near ln(vocab), a gradient for every
    parameter; or no row, skipped for a reason naming the feature megatron-core cannot express."""
    r = mcore_peers[case]
    if "skipped" in r:
        features = MCORE_CASES[case][3]
        assert any(f in r["skipped"].lower() for f in features), (case, r["skipped"])
        return
    count = sum(math.prod(shape) for shape in r["params"].values())
    assert count == r["our_count"], (case, r["params"])
    assert r["loss"] == pytest.approx(math.log(MCORE_VOCAB), abs=0.1), case
    assert not r["no_grad"], case
    assert r["last_sees_first"] == (case != "--family mistral"), case


@pytest.mark.slow
def test_megatron_core_peer_ties_embeddings_as_megatronlite(mcore_peers):
    tied = {preset: "output_layer.weight" not in mcore_peers[preset]["params"] for preset in ("llama-1b", "llama-125m")}
    assert tied == {"llama-1b": True, "llama-125m": False}


@pytest.mark.parametrize(
    "sets, feature",
    [
        (["model.rope_scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 256}"], "rope_scaling"),
        (["model.bias=true", "model.qkv_bias=false"], "model.bias"),
        (["model.moe.num_experts=4", "model.moe.capacity_factor=1.5"], "capacity_factor"),
    ],
)
def test_megatron_core_peer_skips_a_feature_it_cannot_express(sets, feature):
    """What megatron-core has no exact form of skips its row, naming the feature (before anything is built)."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_train

    from megatronlite import config

    cfg = config.load(REPO / "configs" / "demo.yaml", sets)
    with pytest.raises(bench_train.PeerSkipped, match=feature):
        bench_train.mcore_features(cfg.model)
