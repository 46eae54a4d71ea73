"""`megatronlite convert`: every format pair round-trips, --verify reports, bad input exits 2 with one line."""

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import conversion_model
from safetensors import safe_open
from safetensors.torch import save_file

from megatronlite import cli
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint
from megatronlite.convert import Options, read
from megatronlite.convert.model_state import run_config
from megatronlite.errors import UserError
from megatronlite.untrusted import Placeholder
from megatronlite.untrusted import load_torch_file as safe_load

FORMAT_PATHS = {"mlite": "run", "hf": "hf", "megatron": "meg", "torch": "model.pt"}
MODELS = {arch: conversion_model(arch) for arch in ("llama", "gpt2")}


def native(tmp_path, arch="llama", name="src"):
    """A native weights-only checkpoint with random values in every tensor."""
    cfg = run_config(MODELS[arch], name)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) for n, s in expected_shapes(cfg).items()}
    write_checkpoint(tmp_path / name, cfg, tensors.items())
    return tmp_path / name, tensors


def run_cli(*argv) -> None:
    cli.main(["convert", *map(str, argv)])


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatronlite: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("via", ["hf", "megatron", "torch"])
def test_every_format_round_trips_bit_exact(tmp_path, arch, via):
    src, tensors = native(tmp_path, arch)
    mid = tmp_path / FORMAT_PATHS[via]
    run_cli("--from", "mlite", "--to", via, src, mid)
    run_cli("--from", via, "--to", "mlite", mid, tmp_path / "back")
    back = read("mlite", tmp_path / "back", Options())
    assert back.cfg.model == MODELS[arch]
    assert all(torch.equal(back.get(n), t) for n, t in tensors.items())


def test_verify_prints_the_comparison(tmp_path, capsys):
    src, _ = native(tmp_path)
    run_cli("--from", "mlite", "--to", "torch", src, tmp_path / "m.pt", "--verify")
    out = capsys.readouterr().out
    assert "largest |logit difference| 0 " in out and "agrees (2/2 prompts identical)" in out


def test_verify_fails_on_logits_that_differ_with_the_same_greedy_tokens(tmp_path, capsys):
    """A converted model off by a norm scaled 1% still decodes the same tokens: the logits' tolerance fails it."""
    from megatronlite.convert.verify import verify

    src, tensors = native(tmp_path)
    dst = tmp_path / "m.pt"
    run_cli("--from", "mlite", "--to", "torch", src, dst)
    state = torch.load(dst)
    state["model"]["final_norm.weight"] *= 1.01
    torch.save(state, dst)
    report = verify(("mlite", src), ("torch", dst), MODELS["llama"], Options(), narrowed=False)
    assert report.greedy_agrees == report.prompts and not report.passed, report.lines()
    assert "OVER the tolerance 0.0001" in report.lines()[1], report.lines()
    assert verify(("mlite", src), ("torch", dst), MODELS["llama"], Options(), narrowed=True).passed


def test_verify_runs_transformers_for_hf(tmp_path, capsys):
    pytest.importorskip("transformers")
    src, _ = native(tmp_path, "gpt2")
    run_cli("--from", "mlite", "--to", "hf", src, tmp_path / "hf", "--verify")
    out = capsys.readouterr().out
    assert "converted transformers GPT2LMHeadModel" in out and "agrees" in out
    diff = float(out.split("largest |logit difference| ")[1].split()[0])
    assert diff < 1e-4


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    supported = "MistralForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, GPT2LMHeadModel"
    assert "'Phi3ForCausalLM' is not supported" in err and supported in err
    assert not (tmp_path / "out").exists()


def test_a_tensor_whose_shape_disagrees_is_named(tmp_path, capsys):
    src, _ = native(tmp_path)
    run_cli("--from", "mlite", "--to", "hf", src, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32]" in err and "needs [64, 32]" in err


def test_missing_and_extra_tensors_are_named(tmp_path, capsys):
    src, _ = native(tmp_path)
    run_cli("--from", "mlite", "--to", "hf", src, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in stored.items() if k != "model.norm.weight"}, str(weights), {"format": "pt"})
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    assert "tensor model.norm.weight is missing" in err
    save_file({**stored, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, str(weights), {"format": "pt"})
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    assert "tensor model.layers.0.self_attn.q_proj.bias has no place in a llama model" in err


def test_missing_files_are_named(tmp_path, capsys):
    src, _ = native(tmp_path)
    run_cli("--from", "mlite", "--to", "hf", src, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    assert "neither model.safetensors nor model.safetensors.index.json found" in err
    index = {"weight_map": {"x": "part-1.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    err = error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out")
    assert "part-1.safetensors: file not found" in err
    (tmp_path / "hf" / "config.json").unlink()
    assert "config.json: file not found" in error_of(capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", "x")
    assert "none.pt: not found" in error_of(capsys, "--from", "torch", "--to", "mlite", tmp_path / "none.pt", "x")
    assert "none: not found" in error_of(capsys, "--from", "mlite", "--to", "hf", tmp_path / "none", "x")
    assert "no complete checkpoint" in error_of(capsys, "--from", "mlite", "--to", "hf", tmp_path / "hf", "x")


def test_an_existing_destination_is_never_overwritten(tmp_path, capsys):
    src, _ = native(tmp_path)
    (tmp_path / "taken").mkdir()
    err = error_of(capsys, "--from", "mlite", "--to", "hf", src, tmp_path / "taken")
    assert "already exists" in err


def test_a_destination_under_a_file_is_named(tmp_path, capsys):
    src, _ = native(tmp_path)
    (tmp_path / "afile").write_text("x")
    err = error_of(capsys, "--from", "mlite", "--to", "torch", src, tmp_path / "afile" / "out.pt")
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err


def test_unsupported_llama_variants_are_refused(tmp_path, capsys):
    src, _ = native(tmp_path)
    run_cli("--from", "mlite", "--to", "hf", src, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    scaled = {**cfg, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 8.0}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(scaled))
    assert "rope_parameters.rope_type 'linear' is not supported" in error_of(
        capsys, "--from", "hf", "--to", "mlite", tmp_path / "hf", tmp_path / "out"
    )


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatronlite", "convert", "--from", "hf", "--to", "mlite", str(tmp_path), "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "config.json: file not found" in result.stderr and "Traceback" not in result.stderr


class Recorder:
    """Unpickling this with plain pickle would create a file."""

    def __init__(self, path: str) -> None:
        Path(path).touch()


class Trigger:
    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


@pytest.mark.parametrize("call", ["class", "os.system"])
def test_pickled_code_in_a_torch_file_never_runs(tmp_path, call):
    """Megatron files pickle args (rebuilt); any other pickled global becomes an inert placeholder, and torch
    refuses outright the modules it blocks (os, subprocess, ...). Either way nothing runs."""
    marker = tmp_path / "ran"
    trigger = Trigger(Recorder, str(marker)) if call == "class" else Trigger(os.system, f"touch {marker}")
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(num_layers=2), "x": trigger}, path, pickle_module=pickle)
    if call == "class":
        loaded = safe_load(path)
        assert loaded["args"].num_layers == 2 and isinstance(loaded["x"], Placeholder)
    else:
        with pytest.raises(UserError, match="not a readable torch file"):
            safe_load(path)
    assert not marker.exists()
