"""Malformed fields in files from others: each is one line naming the file and key (exit 2), never a traceback,
a silent wrong weight, or memory without bound."""

import json
import pickle

import pytest
import torch
import yaml
from helpers import conversion_model, error_of
from test_convert_megatron import GPT2, _legacy_args
from test_sweep import REPO, write_sweep
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from megatronlite.checkpoint import store
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint, write_checkpoint_lazily
from megatronlite.config import load_raw
from megatronlite.convert import Options, convert
from megatronlite.convert.model_state import run_config
from megatronlite.errors import UserError
from megatronlite.launcher import sweep_spec


def _native(tmp_path, model=None):
    cfg = run_config(model or conversion_model("gpt2"), "src")
    write_checkpoint(tmp_path / "src", cfg, ((n, torch.randn(s)) for n, s in expected_shapes(cfg).items()))
    return tmp_path / "src"


def _convert_error(capsys, fmt, src, tmp_path) -> str:
    return error_of(capsys, "convert", "--from", fmt, "--to", "torch", str(src), str(tmp_path / "out.pt"))


# --- DeepSpeed ZeRO 1/2: the flat partition's layout fields ------------------------------------


@pytest.fixture
def zero2(tmp_path):
    """A one-rank ZeRO-2 checkpoint: our stage-0 export plus an optimizer file whose flat fp32 partition holds
    the module's tensors end to end, as DeepSpeed lays them out."""
    run = tmp_path / "ds"
    convert("mlite", "deepspeed", _native(tmp_path), run, Options())
    step = run / "global_step0"
    module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    flat = torch.cat([t.flatten().float() for t in module.values()])
    flat = torch.cat([flat, torch.zeros(flat.numel() % 2)])  # padded to 2 x DP
    adam = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat), "step": 2}
    optim = {
        "partition_count": 1,
        "single_partition_of_fp32_groups": [flat],
        "base_optimizer_state": {"state": {0: adam}},
        "param_alignment_paddings": [[0] * len(module)],
    }
    torch.save({"optimizer_state_dict": optim}, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return run


def _edit(path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _optim(state):
    return state["optimizer_state_dict"]


@pytest.mark.parametrize(
    "file,change,expected",
    [
        ("optim", lambda s: _optim(s)["param_alignment_paddings"][0].__setitem__(0, -8), "param_alignment_paddings"),
        ("optim", lambda s: _optim(s).update(param_alignment_paddings=[[0]]), "param_alignment_paddings is [[0]]"),
        ("optim", lambda s: _optim(s)["base_optimizer_state"]["state"][0].update(step="x"), "step is 'x'"),
        ("model", lambda s: s.update(param_shapes=[[1, 2]]), "param_shapes is [[1, 2]]"),
        ("model", lambda s: s["param_shapes"][0].update({next(iter(s["module"])): (-1, 8)}), "param_shapes is"),
        ("model", lambda s: s["module"].update({next(iter(s["module"])): 5}), "expected a tensor"),
        ("model", lambda s: s.update(shared_params=[1]), "shared_params is [1]"),
    ],
    ids=["negative-padding", "short-paddings", "step", "shapes-list", "negative-shape", "module", "shared"],
)
def test_deepspeed_layout_fields_are_checked(zero2, tmp_path, capsys, file, change, expected):
    step = zero2 / "global_step0"
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt" if file == "optim" else "mp_rank_00_model_states.pt"
    _edit(step / name, change)
    line = _convert_error(capsys, "deepspeed", zero2, tmp_path)
    assert name in line and expected in line


def test_the_fake_zero2_checkpoint_converts(zero2, tmp_path):
    """The fixture itself is valid, so the refusals above are the fields' doing."""
    convert("deepspeed", "torch", zero2, tmp_path / "ok.pt", Options())


# --- Megatron: args are typed and the layout matches the rank directories -----------------------


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"tensor_model_parallel_size": 4_000_000}, "mp_rank_01/model_optim_rng.pt: file not found (args: TP 4000000"),
        ({"tensor_model_parallel_size": "2"}, "tensor_model_parallel_size is '2'; expected an integer >= 1"),
        ({"pipeline_model_parallel_size": 0}, "pipeline_model_parallel_size is 0; expected an integer >= 1"),
        ({"num_layers": "4"}, "num_layers is '4'; expected an integer >= 1"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0; expected an integer >= 1"),
        ({"hidden_size": "8"}, "hidden_size is '8'"),
        ({"padded_vocab_size": "128"}, "padded_vocab_size is '128'"),
        ({"norm_epsilon": "abc"}, "norm_epsilon is 'abc'; expected a number"),
        ({"window_size": ("x", 0)}, "its left size must be an integer >= -1"),
    ],
    ids=["tp-huge", "tp-str", "pp-0", "layers-str", "heads-0", "hidden-str", "padded-str", "eps", "window"],
)
def test_megatron_args_are_checked(tmp_path, capsys, changes, expected):
    meg = _legacy_args(tmp_path, GPT2, **changes)
    assert expected in _convert_error(capsys, "megatron", meg, tmp_path)


def test_megatron_tracker_naming_a_path_is_refused(tmp_path, capsys):
    meg = _legacy_args(tmp_path, GPT2)
    (meg / "latest_checkpointed_iteration.txt").write_text("../other/release")
    assert "(a plain name, no path)" in _convert_error(capsys, "megatron", meg, tmp_path)
    (meg / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe")
    assert "latest_checkpointed_iteration.txt: the tracker file is not UTF-8" in _convert_error(
        capsys, "megatron", meg, tmp_path
    )


# --- HF ---------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    convert("mlite", "hf", _native(tmp_path), tmp_path / "hf", Options())
    return tmp_path / "hf"


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda c: [1], "config.json: config.json is [1]; expected a JSON object"),
        (lambda c: {**c, "architectures": [["x"]]}, "architectures is [['x']]; expected a list of strings"),
        (lambda c: {**c, "layer_norm_epsilon": "abc"}, "layer_norm_epsilon is 'abc'; expected a number"),
        (lambda c: {**c, "n_head": 0}, "n_head is 0; expected an integer >= 1"),
    ],
    ids=["not-object", "architectures", "eps", "heads"],
)
def test_hf_config_fields_are_checked(hf_dir, tmp_path, capsys, change, expected):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(change(config)))
    assert expected in _convert_error(capsys, "hf", hf_dir, tmp_path)


@pytest.mark.parametrize(
    "weight_map,expected",
    [
        ({"a": 5}, "weight_map is {'a': 5}; expected a mapping of strings to strings"),
        ({"a": "/etc/passwd"}, "(a plain name, no path)"),
        ({"a": "../hf/model.safetensors"}, "(a plain name, no path)"),
    ],
    ids=["int", "absolute", "parent"],
)
def test_hf_index_is_checked(hf_dir, tmp_path, capsys, weight_map, expected):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert expected in _convert_error(capsys, "hf", hf_dir, tmp_path)


def test_hf_config_that_is_not_utf8_is_named(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").write_bytes(b'{"a": "\xff"}')
    assert "config.json: the HF config is not UTF-8 text" in _convert_error(capsys, "hf", hf_dir, tmp_path)


# --- YAML and sweeps ---------------------------------------------------------------------------

LAUGHS = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n"


def test_yaml_aliases_of_lists_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(LAUGHS)
    with pytest.raises(UserError, match=r"c.yaml line 2: .*alias \*a names a list or mapping"):
        load_raw(config)


def test_yaml_aliases_of_scalars_still_work():
    from megatronlite.config import parse_yaml

    assert parse_yaml("a: &x 3\nb: *x") == {"a": 3, "b": 3}


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"name: \xff\n")
    with pytest.raises(UserError, match="c.yaml: the config file is not UTF-8 text"):
        load_raw(config)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"random": {"optim.lr": {"low": 1e-4, "high": 1e-2}}, "trials": 10**8}, "100000000 trials"),
        ({"grid": {"optim.lr": [1e-3] * 200, "train.steps": list(range(1, 101))}}, "20000 trials"),
    ],
    ids=["random", "grid"],
)
def test_sweeps_are_capped_before_expanding(tmp_path, spec, expected):
    with pytest.raises(UserError, match=rf"{expected} .*at most 10000"):
        sweep_spec.load(write_sweep(tmp_path, spec))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("grid:\n  train.steps: [2020-01-01]\n", "datetime.date"),
        ("grid:\n  model.rope_scaling: [{1: a, b: c}]\n", "not a plain YAML value"),
        (LAUGHS.replace("a:", "grid: {}\nx:", 1), "alias *a names a list"),
    ],
    ids=["date", "mixed-keys", "aliases"],
)
def test_sweep_values_must_be_plain(tmp_path, text, expected):
    path = write_sweep(tmp_path, {})
    path.write_text(path.read_text() + text)
    with pytest.raises(UserError, match="sweep.yaml") as error:
        sweep_spec.load(path)
    assert expected in str(error.value)


def test_sweep_base_with_a_bad_section_is_one_line(tmp_path):
    path = write_sweep(tmp_path, {}, base_text=yaml.safe_dump({"logging": 5}))
    with pytest.raises(UserError, match="logging: expected a mapping"):
        sweep_spec.load(path)


def test_sweep_out_that_is_a_file_is_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, {"grid": {"optim.lr": [1e-3]}})
    (tmp_path / "taken").write_text("")
    line = error_of(capsys, "sweep", str(path), "--out", str(tmp_path / "taken"))
    assert f"sweep --out {tmp_path / 'taken'}: cannot make the directory" in line


def test_launch_template_that_is_not_utf8_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    template = tmp_path / "mine.sbatch"
    template.write_bytes(b"#!/bin/bash\n{{run}} \xff\n")
    line = error_of(capsys, "submit", "configs/demo.yaml", "--template", str(template), "--dry-run")
    assert "mine.sbatch: the launch template is not UTF-8 text" in line


# --- torch exports and torch_dist: entries of the wrong kind ----------------------------------------


def test_torch_file_entry_that_is_not_a_tensor_is_named(tmp_path, capsys):
    convert("mlite", "torch", _native(tmp_path), tmp_path / "g.pt", Options())
    _edit(tmp_path / "g.pt", lambda s: s["model"].update({"embedding.position.weight": 5}))
    line = _convert_error(capsys, "torch", tmp_path / "g.pt", tmp_path)
    assert "g.pt: model entry 'embedding.position.weight' is a int; expected a tensor" in line


def test_megatron_stacked_tensor_without_dims_is_named(tmp_path, capsys):
    """A torch_dist entry of size [] is well-formed DCP (one value, one chunk), but no stack of layers."""
    convert("mlite", "megatron", _native(tmp_path), tmp_path / "meg", Options())
    path = tmp_path / "meg" / "release" / ".metadata"
    md = pickle.loads(path.read_bytes())
    key = "decoder.layers.self_attention.linear_qkv.weight"
    entry, empty = md.state_dict_metadata[key], torch.Size([])
    md.storage_data[MetadataIndex(key, empty)] = md.storage_data[MetadataIndex(key, (0,) * len(entry.size))]
    entry.size, entry.chunks = empty, [ChunkStorageMetadata(empty, empty)]
    path.write_bytes(pickle.dumps(md))
    line = _convert_error(capsys, "megatron", tmp_path / "meg", tmp_path)
    assert f"stacked tensor {key} has size []; its first dim must be args.num_layers" in line


# --- native checkpoints: the config and meta.json a step directory holds ---------------------------


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda p: p.unlink(), "config.yaml: cannot read the checkpoint config"),
        (lambda p: p.write_text("model: [1,\n"), "config.yaml line 2: not valid YAML"),
        (lambda p: p.write_text(p.read_text().replace("name:", "nmae:", 1)), "config.yaml: unknown config key 'nmae'"),
    ],
    ids=["missing", "not-yaml", "unknown-key"],
)
def test_checkpoint_config_is_named(tmp_path, capsys, change, expected):
    change(store.find_step_dir(_native(tmp_path)) / "config.yaml")
    line = error_of(capsys, "generate", str(tmp_path / "src"), "--prompt", "a", "--max-new-tokens", "1")
    assert expected in line


def test_a_meta_json_that_is_not_an_object_is_one_line(tmp_path, capsys):
    step_dir = store.find_step_dir(_native(tmp_path))
    (step_dir / "meta.json").write_text("[1]")
    line = error_of(capsys, "generate", str(tmp_path / "src"), "--prompt", "a", "--max-new-tokens", "1")
    assert "meta.json holds list, not a JSON object" in line, line


def test_prompt_outside_the_vocabulary_is_one_line(tmp_path, capsys):
    """The byte tokenizer maps "~" to 126; the model has 77 rows."""
    line = error_of(capsys, "generate", str(_native(tmp_path)), "--prompt", "~", "--max-new-tokens", "1")
    assert "generate: the prompt's '~' is token 126; the model's vocabulary has 77 tokens" in line, line


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda m: m.pop("step"), "step is missing"),
        (lambda m: m.update(step="x"), "step is 'x'; expected an integer >= 0"),
        (lambda m: m.update(optimizer_steps=-1), "optimizer_steps is -1; expected an integer >= 0"),
        (lambda m: m.update(consumed_samples=1.5), "consumed_samples is 1.5; expected an integer >= 0"),
    ],
    ids=["no-step", "step-str", "optimizer-steps", "consumed"],
)
def test_training_checkpoint_meta_is_checked(tmp_path, capsys, change, expected):
    cfg = run_config(conversion_model("gpt2"), "src")
    shapes = expected_shapes(cfg)
    moments = {"exp_avg": lambda n: torch.zeros(shapes[n]), "exp_avg_sq": lambda n: torch.zeros(shapes[n])}
    step_dir = write_checkpoint_lazily(tmp_path / "src", cfg, lambda n: torch.randn(shapes[n]), 3, moments, 3, 24)
    meta = json.loads((step_dir / "meta.json").read_text())
    change(meta)
    (step_dir / "meta.json").write_text(json.dumps(meta))
    assert f"{step_dir / 'meta.json'}: {expected}" in _convert_error(capsys, "mlite", tmp_path / "src", tmp_path)


# --- config from-megatron: the args it computes with ---------------------------------------------


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"window_size": 5}, "--window-size is 5; expected a (left, right) pair of integers"),
        ({"num_attention_heads": 0}, "--num-attention-heads is 0; expected an integer >= 1"),
        ({"train_iters": "x"}, "--train-iters is 'x'; expected an integer >= 1"),
        ({"hidden_size": "8"}, "--hidden-size is '8'; expected an integer >= 1"),
        ({"normalization": ["RMSNorm"]}, "--normalization is ['RMSNorm']; expected a string"),
        ({"virtual_pipeline_model_parallel_size": "2"}, "args.virtual_pipeline_model_parallel_size is '2'"),
    ],
    ids=["window", "heads-0", "iters-str", "hidden-str", "norm-list", "vpp-str"],
)
def test_megatron_checkpoint_args_are_checked_for_config(tmp_path, capsys, changes, expected):
    meg = _legacy_args(tmp_path, GPT2, **changes)
    assert expected in error_of(capsys, "config", "from-megatron", str(meg))


SCRIPT = (
    "python pretrain_gpt.py --num-layers 2 --hidden-size 8 --num-attention-heads 2 --seq-length 8 "
    "--micro-batch-size 1 --lr 1e-3 --vocab-size 16 "
)


@pytest.mark.parametrize(
    "flags,expected",
    [
        ("--train-iters 4 --num-attention-heads 0", "--num-attention-heads is 0; expected an integer >= 1"),
        ("--train-iters 4 --window-size 5", "--window-size is (5,); expected a (left, right) pair of integers"),
        ("--train-samples 4 --global-batch-size 8", "--train-samples 4 is less than one global batch (8)"),
    ],
    ids=["heads-0", "window", "no-step"],
)
def test_megatron_script_values_are_checked(tmp_path, capsys, flags, expected):
    script = tmp_path / "train.sh"
    script.write_text(SCRIPT + flags + "\n")
    line = error_of(capsys, "config", "from-megatron", str(script))
    assert line.startswith(f"megatronlite: error: {script}: ") and expected in line, line
