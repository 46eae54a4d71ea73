"""Conversion holds about one tensor at a time, not the model: measured, for every format both ways.

A model of 16 layers is converted around the formats in a fresh process that samples its
anonymous resident memory (RssAnon: heap, not the page cache of memory-mapped files). glibc is
told to return freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_), so the samples show
live tensors rather than the allocator's reserve.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint_lazily
from megatronlite.config import ModelConfig
from megatronlite.convert import Options, convert
from megatronlite.convert.model_state import run_config

MODEL = ModelConfig(
    arch="llama",
    num_layers=16,
    hidden_size=256,
    num_heads=8,
    num_kv_heads=2,
    ffn_hidden_size=2048,
    vocab_size=8000,
    max_seq_len=64,
)
LEGACY = Options(megatron_format="torch", megatron_tp=2, megatron_pp=2)
STEPS = [  # (from, to, source, destination, options)
    ("mlite", "hf", "src", "hf", Options()),
    ("hf", "mlite", "hf", "from_hf", Options()),
    ("mlite", "megatron", "src", "dist", Options()),
    ("megatron", "mlite", "dist", "from_dist", Options()),
    ("mlite", "megatron", "src", "legacy", LEGACY),
    ("megatron", "mlite", "legacy", "from_legacy", Options()),
    ("mlite", "torch", "src", "model.pt", Options()),
    ("torch", "mlite", "model.pt", "from_torch", Options()),
]


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def _peak_growth(work) -> int:
    """The largest RssAnon above the starting value while `work()` runs, sampled every millisecond."""
    base, peak, done = _rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak[0] - base


def _convert_all(model: ModelConfig, out: Path) -> dict[str, int]:
    cfg = run_config(model, "src")
    shapes = expected_shapes(cfg)
    write_checkpoint_lazily(out / "src", cfg, lambda name: torch.randn(shapes[name]))
    return {
        f"{f} {src} -> {t} {dst}": _peak_growth(functools.partial(convert, f, t, out / src, out / dst, o))
        for f, t, src, dst, o in STEPS
    }


def _measure(out: Path) -> dict[str, int]:
    """Peaks converting MODEL, after a first round on a tiny model has imported and cached what it needs."""
    _convert_all(dataclasses.replace(MODEL, hidden_size=32, num_layers=4, vocab_size=100), out / "warm-up")
    return _convert_all(MODEL, out)


@pytest.mark.slow
def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-4000:]
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    shapes = expected_shapes(run_config(MODEL, "x"))
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    model = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    assert model > 12 * largest
    for step, peak in peaks.items():
        assert peak < 4 * largest, f"{step}: peak {peak / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / "peaks.json").write_text(json.dumps(_measure(out)))
