"""End-to-end: train from the CLI, resume exactly, generate, load_model."""

import importlib.util
import json
import string
import subprocess
import sys

import pytest
import torch
from helpers import final_weights, resume_from, tiny_overrides, train

from megatronlite import config, load_model
from megatronlite.cli import main
from megatronlite.data.preprocess import preprocess


def test_rerunning_a_finished_run_says_there_is_nothing_to_do(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    sets = tiny_overrides(corpus, run, **{"train.steps": 4})
    first = train(run, sets)
    capsys.readouterr()
    assert train(run, sets) == first  # nothing trained, nothing logged again
    out = capsys.readouterr().out
    assert f"nothing to do: {run} is at step 4 and train.steps is 4" in out, out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_falls_and_run_dir_is_complete(tmp_path, corpus, arch):
    run = tmp_path / "run"
    metrics = train(
        run, tiny_overrides(corpus, run, arch, **{"train.steps": 30, "checkpoint.interval": 10, "checkpoint.keep": 3})
    )
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples", "elapsed_s", "mfu"):
        assert key in metrics[-1]
    assert metrics[-1]["consumed_samples"] == 30 * 4
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)
    resolved = config.load(run / "config.yaml")  # the resolved config: the file and its overrides
    assert (resolved.model.arch, resolved.train.steps, resolved.checkpoint.keep) == (arch, 30, 3)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000010", "step_0000020", "step_0000030"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000030"


@pytest.mark.parametrize("arch, precision", [("llama", "fp32"), ("gpt2", "fp32"), ("llama", "bf16")])
def test_resume_is_bit_exact(tmp_path, corpus, arch, precision):
    full = tmp_path / "full"
    reference = train(full, tiny_overrides(corpus, full, arch, **{"train.precision": precision}))
    resumed = tmp_path / "resumed"
    resume_from(full, "step_0000004", resumed)
    after = train(resumed, tiny_overrides(corpus, resumed, arch, **{"train.precision": precision}))
    assert [m["step"] for m in after] == [5, 6, 7, 8]
    assert [m["loss"] for m in after] == [m["loss"] for m in reference[4:]]
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in reference[4:]]


def test_retention_keeps_last_k(tmp_path, corpus):
    run = tmp_path / "run"
    train(run, tiny_overrides(corpus, run, **{"checkpoint.interval": 2, "checkpoint.keep": 2}))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000006", "step_0000008"]


@pytest.mark.slow
def test_generate_and_load_model(tmp_path, corpus):
    run = tmp_path / "run"
    train(run, tiny_overrides(corpus, run, **{"train.steps": 4}))
    model = load_model(run)
    ids = torch.randint(0, 257, (2, 10))
    assert model(ids).shape == (2, 10, 257)
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_0000004"):
        out = subprocess.run(
            [sys.executable, "-m", "megatronlite", "generate", str(path), "--prompt", "def ", "--max-new-tokens", "20"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("def ") and len(out.stdout) > len("def ")


def alphabet_corpus(out) -> str:
    """Documents of the alphabet, repeated from every starting letter: a tiny model learns it in a few steps."""
    letters = string.ascii_lowercase
    with open(out / "docs.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"text": letters[i % 26 :] + letters * 8}) + "\n")
    return preprocess([str(out / "docs.jsonl")], str(out / "abc"), append_eod=True, progress=False)[0]


def test_greedy_generate_is_argmax_decoding_of_the_trained_model(tmp_path, capsys):
    """After training, `generate --temperature 0` must be step-by-step argmax over load_model's logits, the context
    cut to the model's last max_seq_len tokens, and load_model must hold the checkpoint's weights. A model that
    has learnt the alphabet makes the answer one an untrained model or a wrong context would not give."""
    run = tmp_path / "run"
    train(run, tiny_overrides(alphabet_corpus(tmp_path), run, **{"train.steps": 10}))
    model = load_model(run)
    stored = final_weights(run)
    for name, param in model.named_parameters():  # fused [gate; up] and vocabulary padding rows are the model's
        want = torch.cat([stored.pop(k) for k in (name, f"{name}.gate", f"{name}.up") if k in stored])
        assert param.shape[1:] == want.shape[1:] and torch.equal(param[: len(want)], want), name
    assert not stored, f"weights the model lacks: {sorted(stored)}"

    prompt, eod, new_tokens = "abc", 256, 100  # more than max_seq_len (64): the context slides
    ids = list(prompt.encode())
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = int(model(torch.tensor([ids[-model.cfg.max_seq_len :]]))[0, -1].argmax())
            if nxt == eod:
                break
            ids.append(nxt)
    assert bytes(ids).startswith(b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz")
    capsys.readouterr()  # the training's output
    main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--temperature", "0"])
    assert capsys.readouterr().out.encode() == bytes(ids) + b"\n"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, corpus, precision):
    run = tmp_path / "run"
    metrics = train(run, tiny_overrides(corpus, run, **{"train.precision": precision, "train.steps": 6}))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.parametrize(
    "option",
    [
        "optim.offload=true",
        "optim.impl=triton",
        "optim.impl=torch",
        "train.recompute=selective",
        pytest.param("train.kernels={rms_norm: triton, swiglu: triton, rotary: triton}", marks=pytest.mark.slow),
        pytest.param("train.compile=true", marks=pytest.mark.slow),
    ],
)
def test_speed_and_memory_options_keep_the_losses(tmp_path, corpus, option):
    if "triton" in option and importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    base = train(tmp_path / "base", tiny_overrides(corpus, tmp_path / "base", **{"train.steps": 4}))
    run = tmp_path / "opt"
    metrics = train(run, tiny_overrides(corpus, run, **{"train.steps": 4}) + [option])
    for got, want in zip(metrics, base):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), option
