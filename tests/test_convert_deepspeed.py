"""`convert --from deepspeed` / `--to deepspeed` on real checkpoints written in the test by DeepSpeed's
`engine.save_checkpoint` over a random HF LlamaForCausalLM (CPU, gloo, fp32, 2 AdamW steps).

The references come from DeepSpeed's own API in the training processes (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`): trusted code, unlike anything in the checkpoint directory. DeepSpeed
builds its `deepspeed_shm_comm_op` on first use (about 3 minutes on a 2-core machine, then cached in
~/.cache/torch_extensions), so the first test here is slow once per machine.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from helpers import error_of, set_args, spawn  # noqa: E402

from megatronlite.checkpoint import store  # noqa: E402
from megatronlite.cli import main  # noqa: E402
from megatronlite.convert import hf  # noqa: E402
from megatronlite.convert.formats import convert, read  # noqa: E402
from megatronlite.convert.model_state import Options, build_model  # noqa: E402

VOCAB, SEQ = 257, 16  # the byte tokenizer's vocabulary: the converted run trains on byte-tokenized text
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    architectures=["LlamaForCausalLM"],
)


def _engine(stage: int, model: torch.nn.Module):
    import deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    return engine


def _save(rank: int, world: int, stage: int, out: Path) -> None:
    """(Each rank.) Train 2 steps at ZeRO `stage`, save, and (rank 0) write the trained weights and exp_avg."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    engine = _engine(stage, model)
    torch.manual_seed(1 + rank)  # every rank its own data
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(out / "run"))
    names = dict(engine.module.named_parameters())  # every rank gathers (a collective at ZeRO-3)
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in names.items()}
    exp_avg = {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in names.items()}
    if rank == 0:
        model.config.save_pretrained(out / "run")
        torch.save({"weights": weights, "exp_avg": exp_avg}, out / "reference.pt")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    spawn(_save, 1, 2, out, timeout=240)  # within pytest's 300 s, with the CPU op built (or building) first
    return out


def _hf_logits(weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(tokens).logits


def _check(out: Path, tmp_path: Path) -> Path:
    """Convert `out/run` to mlite; its logits are the HF model's of the trained weights; exp_avg arrives."""
    ref = torch.load(out / "reference.pt", weights_only=True)
    ckpt = convert("deepspeed", "mlite", out / "run", tmp_path / "mlite", Options())
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    converted = build_model(read("mlite", tmp_path / "mlite", Options()))
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), _hf_logits(ref["weights"], tokens), rtol=1e-5, atol=1e-5)
    mapping = hf.family_for(ckpt.cfg.model).mapping(ckpt.cfg.model)
    qkv = "layers.1.attention.qkv.weight"  # Q, K and V regrouped: the moments move like the weights
    expected = mapping.ours(qkv, ref["exp_avg"].__getitem__)
    assert expected.abs().max() > 0
    step_dir = store.find_step_dir(tmp_path / "mlite")
    assert step_dir.name == "step_0000002" and store.read_meta(step_dir)["optimizer_steps"] == 2
    stored = {f"optim.exp_avg.{qkv}": torch.empty(expected.shape)}
    store.read_shards(step_dir, stored)
    torch.testing.assert_close(stored[f"optim.exp_avg.{qkv}"], expected, rtol=0, atol=0)
    return tmp_path / "mlite"


def test_zero2_converts_with_fp32_masters_and_moments(zero2, tmp_path):
    _check(zero2, tmp_path)
    # the run directory and its global_stepN directory are both sources
    again = read("deepspeed", zero2 / "run" / "global_step2", Options())
    torch.testing.assert_close(
        again.get("final_norm.weight"), read("mlite", tmp_path / "mlite", Options()).get("final_norm.weight")
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_dp2_converts(stage, tmp_path):
    spawn(_save, 2, stage, tmp_path, timeout=240)
    files = sorted(p.name for p in (tmp_path / "run" / "global_step2").iterdir())
    assert sum("optim_states" in f for f in files) == 2, files
    _check(tmp_path, tmp_path / "out")


def _round_trip(rank: int, world: int, src: Path, out: Path) -> None:
    """(One rank.) Load the `--to deepspeed` output into a fresh engine (ZeRO-2) and save its logits."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.manual_seed(5)  # other weights than the checkpoint's
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(src))
    engine = _engine(2, model)
    path, _ = engine.load_checkpoint(str(src), load_module_only=True)
    assert path is not None
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save(engine(input_ids=tokens).logits, out)


def test_to_deepspeed_loads_in_engine(zero2, tmp_path):
    convert("deepspeed", "deepspeed", zero2 / "run", tmp_path / "ds", Options())
    assert (tmp_path / "ds" / "latest").read_text() == "global_step0"
    spawn(_round_trip, 1, tmp_path / "ds", tmp_path / "logits.pt", timeout=120)
    ref = torch.load(zero2 / "reference.pt", weights_only=True)["weights"]
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits, _hf_logits(ref, tokens), rtol=1e-5, atol=1e-5)
    # and our reader reads it back (stage 0: the module's tensors)
    back = read("deepspeed", tmp_path / "ds", Options())
    torch.testing.assert_close(back.get("final_norm.weight"), ref["model.norm.weight"])


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {Boom.marker}",))


def test_malicious_pickle_is_refused(zero2, tmp_path, capsys):
    run = tmp_path / "run"
    step = run / "global_step2"
    step.mkdir(parents=True)
    (run / "latest").write_text("global_step2")
    (run / "config.json").write_text(json.dumps(HF_CONFIG))
    Boom.marker = tmp_path / "pwned"
    states = torch.load(zero2 / "run" / "global_step2" / "mp_rank_00_model_states.pt", weights_only=True)
    torch.save({**states, "lr_scheduler": Boom()}, step / "mp_rank_00_model_states.pt")
    line = error_of(capsys, "convert", "--from", "deepspeed", "--to", "mlite", str(run), str(tmp_path / "out"))
    assert "refusing to unpickle posix.system" in line or "refusing to unpickle os.system" in line, line
    assert not Boom.marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's own weights-only load would refuse it too
        torch.load(step / "mp_rank_00_model_states.pt", weights_only=True)


def test_latest_naming_a_path_is_refused(zero2, tmp_path, capsys):
    (tmp_path / "latest").write_text("../../etc")
    line = error_of(capsys, "convert", "--from", "deepspeed", "--to", "mlite", str(tmp_path), str(tmp_path / "o"))
    assert "not a checkpoint directory inside" in line


def test_config_elsewhere_needs_hf_config(zero2, tmp_path, capsys):
    step = tmp_path / "moved" / "global_step2"  # no config.json beside it or one level up
    shutil.copytree(zero2 / "run" / "global_step2", step)
    line = error_of(capsys, "convert", "--from", "deepspeed", "--to", "mlite", str(step), str(tmp_path / "o"))
    assert "no HF config.json; point to the model's with --hf-config DIR" in line
    args = ["convert", "--from", "deepspeed", "--to", "mlite", str(step), str(tmp_path / "o")]
    main([*args, "--hf-config", str(zero2 / "run")])
    assert "converted deepspeed" in capsys.readouterr().out


@pytest.mark.slow
def test_converted_run_continues_training(zero2, tmp_path):
    """`megatronlite train` from the converted run resumes at the source's step 2 with its weights and moments."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}. " * 8}) + "\n" for i in range(50)))
    cli = [sys.executable, "-m", "megatronlite"]
    pre = ["preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "text"), "--append-eod"]
    subprocess.run([*cli, *pre], check=True, capture_output=True, timeout=120)
    run = _check(zero2, tmp_path)
    sets = [
        f"checkpoint.load={run}",
        f"data.sources=[{{path: {tmp_path / 'text'}}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=4",
        "train.seq_len=16",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.eval_interval=0",
        "logging.interval=1",
    ]
    cmd = [*cli, "train", str(run / "config.yaml"), "--run-dir", str(tmp_path / "train")]
    done = subprocess.run([*cmd, *set_args(sets)], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step_0000002 at step 2" in done.stdout
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 4] and all(m["loss"] < 10 for m in metrics)
