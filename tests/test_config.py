import inspect
import subprocess
import sys

import pytest
import yaml

from megatronlite import config
from megatronlite.errors import UserError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_name_from_file(tmp_path):
    cfg = config.load(write(tmp_path, "small.yaml", "model: {hidden_size: 64, num_heads: 4}\n"))
    assert cfg.name == "small"
    assert cfg.model.hidden_size == 64 and cfg.model.kv_heads == 4


def test_unknown_key_names_closest(tmp_path):
    p = write(tmp_path, "c.yaml", "model: {hiden_size: 64}\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'"):
        config.load(p)


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match=r"'trian'.*'train'"):
        config.load(write(tmp_path, "c.yaml", "trian: {steps: 3}\n"))


def test_type_error_names_key(tmp_path):
    with pytest.raises(UserError, match=r"'train.steps': expected int, got 'ten'"):
        config.load(write(tmp_path, "c.yaml", "train: {steps: ten}\n"))


def test_int_accepted_for_float(tmp_path):
    assert config.load(write(tmp_path, "c.yaml", "optim: {lr: 1}\n")).optim.lr == 1.0


def test_extends_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model: {hidden_size: 128, num_heads: 4}\ntrain: {steps: 7}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain: {seq_len: 32}\n")
    cfg = config.load(child, ["train.steps=9", "data.sources=[{path: a, weight: 2}]", "checkpoint.load=null"])
    assert cfg.model.hidden_size == 128 and cfg.train.steps == 9 and cfg.train.seq_len == 32
    assert cfg.data.sources == [{"path": "a", "weight": 2}]
    assert cfg.checkpoint.load is None


def test_async_key_spelled_as_in_yaml(tmp_path):
    cfg = config.load(write(tmp_path, "c.yaml", "checkpoint: {async: true}\n"))
    assert cfg.checkpoint.async_save is True
    assert cfg.to_dict()["checkpoint"]["async"] is True


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        config.load(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {hidden_size: 100, num_heads: 8}", r"num_heads \(8\) must divide model.hidden_size \(100\)"),
        ("model: {num_heads: 8, num_kv_heads: 3}", r"num_kv_heads \(3\) must divide"),
        ("train: {micro_batch_size: 3, global_batch_size: 8}", r"global_batch_size \(8\) .* valid: 3, 6, 9"),
        ("train: {seq_len: 4096}", r"seq_len \(4096\) exceeds model.max_seq_len"),
        ("train: {precision: fp8}", r"'train.precision' = 'fp8'; valid values: auto, fp32, bf16, fp16"),
        ("optim: {lr: 0.001, min_lr: 0.01}", r"min_lr"),
        ("train: {steps: 0}", r"'train.steps' must be > 0"),
        ("train: {kernels: {adamw: triton}}", r"train.kernels.adamw: the optimizer is set by optim.impl"),
        ("parallel: {pipeline_schedule: 2f2b}", r"valid values: null, 1f1b, interleaved, gpipe, zero_bubble"),
        ("model: {arch: falcon}", r"'model.arch' = 'falcon'; valid values: llama, gpt2, qwen2, qwen3, mistral"),
        ("model: {norm: batchnorm}", r"'model.norm' = 'batchnorm'; valid values: rmsnorm, layernorm"),
        ("model: {hidden_size: 96, num_heads: 8, head_dim: 5}", r"even head size; .* = 5"),
        ("model: {sliding_window: 0}", r"'model.sliding_window' must be > 0"),
        ("model: {rope_scaling: {type: ntk}}", r"'model.rope_scaling.type' = 'ntk'; valid values: llama3, yarn"),
        ("model: {rope_scaling: {type: yarn, factor: 4}}", r"yarn needs original_max_position_embeddings"),
        ("model: {rope_scaling: {type: yarn, factor: 4, original_max_position_embeddings: 8, mscale: 1}}", "mscale"),
        ("model: {arch: gpt2, rope_scaling: {type: yarn, factor: 4, original_max_position_embeddings: 8}}", "learned"),
        (
            "data: {eod_mask_loss: true}\ntrain: {kernels: {linear_cross_entropy: torch}}",
            r"data.eod_mask_loss needs the unfused loss",
        ),
    ],
)
def test_inconsistent_values(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        config.load(write(tmp_path, "c.yaml", text + "\n"))


def test_layout_validation():
    cfg = config.from_dict({"model": {"num_heads": 8, "num_kv_heads": 2}, "train": {"global_batch_size": 8}})
    with pytest.raises(UserError, match=r"world size 6 is not divisible"):
        config.validate_layout(_with(cfg, tensor=4), 6)
    with pytest.raises(UserError, match=r"parallel.tensor \(4\) must divide.*num_kv_heads \(2\); valid: 1, 2"):
        config.validate_layout(_with(cfg, tensor=4), 4)
    with pytest.raises(UserError, match=r"micro_batch_size x data-parallel size \(4 x 4 = 16\)"):
        config.validate_layout(cfg, 4)
    with pytest.raises(UserError, match=r"num_layers \(4\) must divide over"):
        config.validate_layout(_with(cfg, pipeline=3), 3)
    assert config.validate_layout(cfg, 2) == 2
    # virtual stages imply the interleaved schedule unless another is named (as Megatron does)
    virtual = _with(cfg, pipeline=2, virtual_pipeline=2)
    assert virtual.parallel.schedule == "interleaved" and _with(cfg, pipeline=2).parallel.schedule == "1f1b"
    with pytest.raises(UserError, match=r"virtual_pipeline = 2 needs .* not gpipe"):
        config.validate_layout(_with(virtual, pipeline_schedule="gpipe"), 2)
    with pytest.raises(UserError, match=r"virtual_pipeline = 2 needs parallel.pipeline > 1"):
        config.validate_layout(_with(cfg, virtual_pipeline=2), 1)
    # torch's 1F1B runs no fewer micro-batches than stages: 8 samples in micro-batches of 4 are 2, for 4 stages
    with pytest.raises(UserError, match=r"1f1b schedule needs at least parallel.pipeline \(4\) .* not 2"):
        config.validate_layout(_with(cfg, pipeline=4), 4)
    assert config.validate_layout(_with(cfg, pipeline=4, pipeline_schedule="gpipe"), 4) == 1


def test_context_parallel_layout_validation():
    cfg = config.from_dict({"train": {"global_batch_size": 8, "seq_len": 48}, "model": {"max_seq_len": 64}})
    with pytest.raises(UserError, match=r"world size 6 is not divisible by .* x parallel.context \(1 x 1 x 4\)"):
        config.validate_layout(_with(cfg, context=4), 6)
    with pytest.raises(UserError, match=r"2 x parallel.context \(10\) equal chunks: train.seq_len \(48\) .* by 10"):
        config.validate_layout(_with(cfg, context=5), 5)
    with pytest.raises(UserError, match=r"sequence \(train.seq_len / parallel.context = 12\) divisible by .* \(8\)"):
        config.validate_layout(_with(cfg, context=4, tensor=8, sequence_parallel=True), 32)
    assert config.validate_layout(_with(cfg, context=4), 8) == 2  # DP = world / (tp x pp x cp)
    with pytest.raises(UserError, match=r"'parallel.context_attention' = 'ulysses'; valid values: ring, allgather"):
        config.validate(_with(cfg, context_attention="ulysses"))


def _with(cfg, **parallel):
    import dataclasses

    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(write(tmp_path, "c.yaml", "model: {a: [\n"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/nope.yaml"], "config file not found"),
        (["configs/demo.yaml", "--set", "model.hiden_size=3"], "did you mean 'model.hidden_size'"),
        (["configs/demo.yaml", "--set", "data.sources=[{path: /nonexistent/prefix}]"], "/nonexistent/prefix"),
        (["configs/demo.yaml", "--set", "checkpoint.load=/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["configs/demo.yaml", "--set", "data.sources=[{pth: x}]"], "did you mean 'data.sources[0].path'"),
        (["configs/demo.yaml", "--set", "model.ffn_hidden_size=-3"], "'model.ffn_hidden_size' must be > 0"),
        (["configs/demo.yaml", "--set", "optim.beta1=2"], "'optim.beta1' must be in [0, 1)"),
        (["configs/demo.yaml", "--set", "checkpoint.keep=-1"], "'checkpoint.keep' must be >= 0"),
        (["configs/demo.yaml", "--set", "train.eval_iters=0"], "'train.eval_iters' must be > 0"),
        (["configs/demo.yaml", "--set", "train.global_batch_size=12"], "valid: 8, 16, 24"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    from helpers import error_of

    assert message in error_of(capsys, "train", *args, "--run-dir", str(tmp_path / "run"))


def test_a_cli_error_is_one_line_from_the_process_too(tmp_path):
    """What the process prints, imports and all: nothing but the one line (no warning, no traceback), exit 2."""
    run = subprocess.run(
        [sys.executable, "-m", "megatronlite", "train", "configs/demo.yaml", "--set", "model.hiden_size=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'model.hidden_size'" in lines[0], run.stderr


def test_exponent_floats_in_files_and_overrides(tmp_path):
    """`1e-4` is how Megatron users write numbers; YAML 1.1 alone would read it as a string."""
    p = write(tmp_path, "c.yaml", "optim: {lr: 1e-3, min_lr: 3E-5}\nmodel: {rope_theta: 5e5}\n")
    cfg = config.load(p)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.model.rope_theta) == (1e-3, 3e-5, 5e5)
    cfg = config.load(p, ["optim.lr=1e-4", "optim.min_lr=+1.5e-5", "model.rope_theta=1e4", "optim.eps=.5E-8"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.model.rope_theta, cfg.optim.eps) == (1e-4, 1.5e-5, 1e4, 0.5e-8)
    assert isinstance(cfg.model.rope_theta, float)


def test_yaml_otherwise_as_safe_load(tmp_path):
    raw = config.apply_overrides({}, ["a.int=100", "a.under=1_000", "a.word=1e", "a.name=e5", "a.list=[1e2, x]"])
    assert raw["a"] == {"int": 100, "under": 1000, "word": "1e", "name": "e5", "list": [100.0, "x"]}
    assert yaml.safe_load("1e-4") == "1e-4"  # the extra resolver stays on our loader
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(write(tmp_path, "c.yaml", "optim: !!python/object/apply:os.getcwd []\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.nan", "config key 'optim.lr' must be a finite number, got nan"),
        ("optim.lr=.inf", "config key 'optim.lr' must be a finite number, got inf"),
        ("optim.clip_grad=-.inf", "config key 'optim.clip_grad' must be a finite number, got -inf"),
        ("model.rope_theta=1e999", "config key 'model.rope_theta' must be a finite number, got inf"),
        ("data.sources=[{path: x, weight: .NaN}]", "config key 'data.sources[0].weight' must be a finite number"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, capsys, override, message):
    from helpers import error_of

    line = error_of(capsys, "train", "configs/demo.yaml", "--run-dir", str(tmp_path / "run"), "--set", override)
    assert line.startswith("megatronlite: error: config key") and message in line


def test_arch_is_a_preset_of_features_each_overridable(tmp_path):
    qwen3 = config.load(write(tmp_path, "q.yaml", "model: {arch: qwen3, qk_norm: false, head_dim: 64}\n")).model
    assert (qwen3.norm, qwen3.activation, qwen3.position, qwen3.rope_theta) == ("rmsnorm", "swiglu", "rope", 1e6)
    assert (qwen3.qk_norm, qwen3.head_size, qwen3.norm_eps) == (False, 64, 1e-6)
    gpt2 = config.ModelConfig(arch="gpt2")
    assert (gpt2.norm, gpt2.activation, gpt2.position, gpt2.bias, gpt2.qkv_bias, gpt2.tied) == (
        "layernorm",
        "gelu",
        "learned",
        True,
        True,
        True,
    )
    assert config.ModelConfig(arch="qwen2").qkv_bias and not config.ModelConfig(arch="qwen2").bias
    # a saved run's config (every feature written out) loads back as the same model
    assert config.from_dict({"model": config.Config(model=qwen3).to_dict()["model"]}).model == qwen3


def test_precision_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere():
    t = config.load("configs/demo.yaml", []).train
    assert t.precision == "auto"
    assert config.precision_on(t, "cuda") == "bf16"
    assert config.precision_on(t, "cuda", bf16_supported=False) == "fp32"  # a V100
    assert config.precision_on(t, "cpu") == "fp32"
    t.precision = "fp16"
    assert config.precision_on(t, "cuda") == config.precision_on(t, "cpu") == "fp16"  # a named one stays


@pytest.mark.parametrize("counts", [["a", "b"], [True, 3], [2.0, 2.0]])
def test_pipeline_layers_must_be_integers(counts):
    """Checked before they are summed: strings were a TypeError, and True counted as one layer."""
    cfg = config.from_dict({"model": {"num_layers": 4}, "train": {"global_batch_size": 8}})
    with pytest.raises(UserError, match=r"parallel.pipeline_layers = .* must list 2 positive layer counts"):
        config.validate_layout(_with(cfg, pipeline=2, pipeline_layers=counts), 2)


def _deepspeed(section: str) -> config.Config:
    return config.from_dict(
        config.apply_overrides({}, ["parallel.engine=deepspeed", "parallel.zero_stage=1", f"deepspeed={section}"])
    )


@pytest.mark.parametrize(
    "section, message",
    [
        (
            "{zero_optimizationn: {}}",
            "unknown config key 'deepspeed.zero_optimizationn'; did you mean 'deepspeed.zero_optimization'?",
        ),
        ("{no_such_knob: 1}", "unknown config key 'deepspeed.no_such_knob'; valid keys: activation_checkpointing"),
        ("{zero_optimization: 5}", "config key 'deepspeed.zero_optimization': expected a mapping of ZeRO settings"),
        ("{zero_optimization: [1]}", "config key 'deepspeed.zero_optimization': expected a mapping"),
    ],
)
def test_deepspeed_section_keys_and_types_are_checked(section, message):
    with pytest.raises(UserError) as e:
        _deepspeed(section)
    assert message in str(e.value)


def test_deepspeed_section_accepts_what_deepspeed_reads():
    cfg = _deepspeed(
        "{zero_optimization: {overlap_comm: false}, activation_checkpointing: {}, wall_clock_breakdown: 1}"
    )
    assert cfg.deepspeed["zero_optimization"] == {"overlap_comm": False}


def test_deepspeed_keys_are_the_installed_deepspeeds():
    """DEEPSPEED_KEYS against what the installed DeepSpeed's config parser reads from the top level (recorded),
    so an upgrade that adds or removes a key fails here rather than refusing, or passing, a user's section."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import config as ds_config

    class Recorder(dict):
        read: set = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def keys(self):
            return self  # `key in d.keys()` is recorded too

    parser = object.__new__(ds_config.DeepSpeedConfig)
    parser.world_size = 1
    parser._initialize_params(Recorder(steps_per_print=10))  # not empty: some configs read nothing from {}
    outside = {"vocabulary_size", "sequence_parallel_size"}  # read by DeepSpeedConfig.__init__ and a method
    assert Recorder.read | outside == set(config.DEEPSPEED_KEYS)
    assert not set(config.DEEPSPEED_KEYS) & set(ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    from deepspeed.runtime import constants

    source = inspect.getsource(ds_config.DeepSpeedConfig) + inspect.getsource(constants)
    assert all(key in source for key in outside)
