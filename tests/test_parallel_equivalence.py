"""Every parallel layout trains the same model as one process: same losses, same final weights."""

import math

import pytest
import torch
from helpers import final_weights, launch, read_metrics, tiny_overrides

LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2-gpipe": (2, ["parallel.pipeline=2", "parallel.pipeline_schedule=gpipe"]),
    "pp2-interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),  # virtual stages imply it
    # the pipeline's loss goes through the model's own loss path: here the chunked (fused) cross-entropy
    "pp2-fused-ce": (2, ["parallel.pipeline=2", "train.kernels={linear_cross_entropy: torch}"]),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
    "pp2xdp2-zero-bubble": (
        4,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zero_bubble"],
    ),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2xdp2": (4, ["parallel.tensor=2"]),
    "pp2xdp2": (4, ["parallel.pipeline=2"]),
    "tp2xpp2xdp2": (
        8,
        [
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.sequence_parallel=true",
            "parallel.distributed_optimizer=true",
        ],
    ),
}
SLOW = {"tp2xpp2xdp2"}


def overrides(corpus, run_dir, arch):
    return tiny_overrides(
        corpus,
        run_dir,
        arch,
        **{"model.num_layers": 4, "train.steps": 5, "train.global_batch_size": 8, "checkpoint.interval": 0},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    runs = {}
    for arch in ("llama", "gpt2"):
        run = tmp_path_factory.mktemp(f"ref-{arch}") / "run"
        done = launch("configs/demo.yaml", run, 1, overrides(corpus, run, arch))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[arch] = (read_metrics(run), final_weights(run))
    return runs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in LAYOUTS])
def test_layout_equals_single_process(tmp_path, corpus, reference, arch, layout):
    nproc, sets = LAYOUTS[layout]
    run = tmp_path / "run"
    done = launch("configs/demo.yaml", run, nproc, overrides(corpus, run, arch) + sets)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_metrics, ref_weights = reference[arch]
    metrics = read_metrics(run)
    assert len(metrics) == len(ref_metrics) == 5
    for got, want in zip(metrics, ref_metrics):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5), (got["step"], got["loss"], want["loss"])
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=1e-4), got["step"]
    weights = final_weights(run)
    assert weights.keys() == ref_weights.keys()
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=5e-5, msg=name)
