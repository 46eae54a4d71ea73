"""HF Mixtral, Qwen2-MoE and Qwen3-MoE <-> megatronlite's mixture of experts, checked against transformers itself
(random models, no downloads): logits and greedy decoding (`--verify`), exact round trips, clean loading."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from helpers import error_of  # noqa: E402
from test_convert_hf import VOCAB, hf_greedy, random_model, save_hf, tensors  # noqa: E402

from megatronlite import config, load_model  # noqa: E402
from megatronlite.checkpoint.weights import expected_shapes  # noqa: E402
from megatronlite.cli import main  # noqa: E402
from megatronlite.convert import Options, hf, read  # noqa: E402
from megatronlite.errors import UserError  # noqa: E402
from megatronlite.train.generate import generate_ids  # noqa: E402

SEQ = 40
SHAPE = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    intermediate_size=48,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
CASES = {
    # name: (HF family, config kwargs, model features and model.moe settings the import must read)
    "mixtral-window": (
        "Mixtral",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=9),
        dict(arch="mistral", sliding_window=9, ffn_hidden_size=48, rope_theta=1e6),
        dict(num_experts=4, top_k=2, ffn_hidden_size=48, layer_freq=1, normalize_top_k=True),
    ),
    "qwen2-moe-shared-dense-layer-window": (
        "Qwen2Moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[1],
            router_aux_loss_coef=0.02,
            use_sliding_window=True,
            sliding_window=7,
            layer_types=["sliding_attention"] * 3,
        ),
        dict(arch="qwen2", qkv_bias=True, ffn_hidden_size=48, sliding_window=7),
        dict(
            num_experts=4,
            top_k=2,
            ffn_hidden_size=24,
            layer_freq=[1, 0, 1],
            shared_expert_ffn_hidden_size=40,
            shared_expert_gate=True,
            normalize_top_k=False,
            aux_loss_coeff=0.02,
        ),
    ),
    "qwen3-moe-sparse-step-normalized-window": (
        "Qwen3Moe",
        dict(
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            head_dim=12,
            use_sliding_window=True,
            sliding_window=9,
        ),
        dict(arch="qwen3", qk_norm=True, head_dim=12, sliding_window=9),
        dict(num_experts=5, top_k=3, layer_freq=[0, 1, 0], normalize_top_k=True, shared_expert_ffn_hidden_size=0),
    ),
}


def family_model(case: str):
    family, kwargs, _, _ = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**{**SHAPE, **kwargs})
    return random_model(getattr(transformers, f"{family}ForCausalLM"), cfg)


def convert_cli(capsys, src_fmt, dst_fmt, src, dst) -> str:
    """`convert --verify`: its output, after checking the greedy check agreed and the logits are close."""
    main(["convert", "--from", src_fmt, "--to", dst_fmt, str(src), str(dst), "--verify"])
    out = capsys.readouterr().out
    assert "agrees (2/2 prompts identical)" in out, out
    diff = float(out.split("largest |logit difference| ")[1].split()[0])
    assert diff < 1e-4, out
    return out


def mlite_tensors(path) -> dict:
    ckpt = read("mlite", path, Options())
    return {name: ckpt.get(name) for name in expected_shapes(ckpt.cfg)}


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
    """(case, directory, the transformers model): HF -> mlite with --verify done once per family."""
    case, tmp = request.param, tmp_path_factory.mktemp(request.param)
    model = family_model(case)
    save_hf(model, tmp / "hf")
    main(["convert", "--from", "hf", "--to", "mlite", str(tmp / "hf"), str(tmp / "ml"), "--verify"])
    return case, tmp, model


def test_import_reads_the_experts_and_matches_transformers(imported):
    """Every MoE setting comes from the config's keys; logits within 1e-4 of transformers', the same greedy
    continuation."""
    case, tmp, theirs = imported
    ours = load_model(tmp / "ml")
    _, _, features, moe = CASES[case]
    assert {k: getattr(ours.cfg, k) for k in features} == features
    assert {k: getattr(ours.cfg.moe, k) for k in moe} == moe
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    prompt = ids[0, :5].tolist()
    assert generate_ids(ours, prompt, 16) == hf_greedy(theirs, prompt, 16)


def test_round_trip_is_bit_exact_and_loads_cleanly(imported, capsys):
    """mlite -> HF (`--verify` against transformers) -> mlite: the same architecture, HF tensors equal to the
    original's bit for bit, loaded by transformers with no missing or unexpected key, and mlite tensors equal."""
    case, tmp, theirs = imported
    convert_cli(capsys, "mlite", "hf", tmp / "ml", tmp / "back")
    architecture = f"{CASES[case][0]}ForCausalLM"
    assert json.loads((tmp / "back" / "config.json").read_text())["architectures"] == [architecture]
    back, info = getattr(transformers, architecture).from_pretrained(str(tmp / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    before, after = tensors(tmp / "hf"), tensors(tmp / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, theirs(ids).logits)
    main(["convert", "--from", "hf", "--to", "mlite", str(tmp / "back"), str(tmp / "again")])
    first, again = mlite_tensors(tmp / "ml"), mlite_tensors(tmp / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_fused_experts_read_as_transformers_holds_them(imported, tmp_path):
    """A file of transformers 5's in-memory names (`mlp.experts.gate_up_proj` [E, 2f, h], `down_proj`) converts
    to the same tensors as the per-expert checkpoint `save_pretrained` writes."""
    case, tmp, theirs = imported
    (tmp_path / "fused").mkdir()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp / "hf" / "config.json").read_text())
    main(["convert", "--from", "hf", "--to", "mlite", str(tmp_path / "fused"), str(tmp_path / "ml")])
    first, fused = mlite_tensors(tmp / "ml"), mlite_tensors(tmp_path / "ml")
    assert first.keys() == fused.keys()
    assert all(torch.equal(first[k], fused[k]) for k in first)


def test_keys_at_their_defaults_may_be_absent(imported):
    """Hub configs omit keys the config class defaults (Qwen2-MoE's qkv_bias, Mixtral's rope theta 1e6...): with
    every key equal to the class default removed, the model read is the same."""
    case, tmp, _ = imported
    raw, family = hf.read_config(tmp / "hf")
    defaults = getattr(transformers, f"{CASES[case][0]}Config")()
    trimmed = {k: v for k, v in raw.items() if k == "architectures" or getattr(defaults, k, ...) != v}
    assert len(trimmed) < len(raw) - 5
    assert family.model_config(trimmed, tmp) == family.model_config(raw, tmp)


def test_export_chooses_the_moe_family_by_features(tmp_path):
    """A llama MoE (no qk-norm, renormalised, every layer) is a Mixtral; one no family holds is refused, naming
    what stops each, and never written as a dense family."""
    cfg = config.load("configs/models/qwen3-moe-tiny.yaml")
    assert hf.family_for(cfg.model).ARCHITECTURE == "Qwen3MoeForCausalLM"
    llama = dataclasses.replace(cfg.model, arch="llama", qk_norm=False, rope_theta=1e4, head_dim=None)
    assert hf.family_for(llama).ARCHITECTURE == "MixtralForCausalLM"
    cases = {
        "router": "model.moe.router: sigmoid",
        "capacity_factor": "model.moe.capacity_factor: 1.5",
        "bias_update_rate": "model.moe.bias_update_rate: 0.001",
        "scaling_factor": "model.moe.scaling_factor: 2.5",
    }
    values = dict(router="sigmoid", capacity_factor=1.5, bias_update_rate=1e-3, scaling_factor=2.5)
    for key, blocker in cases.items():
        m = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, **{key: values[key]}))
        with pytest.raises(UserError, match="no HF architecture") as e:
            hf.family_for(m)
        assert f"Qwen3MoeForCausalLM lacks {blocker}" in str(e.value)
        assert "Qwen3ForCausalLM lacks model.moe.num_experts: 8" in str(e.value)
    unnormalised = dataclasses.replace(llama, moe=dataclasses.replace(llama.moe, normalize_top_k=False))
    with pytest.raises(UserError, match="MixtralForCausalLM lacks model.moe.normalize_top_k: False"):
        hf.family_for(unnormalised)


QWEN2_MOE = dict(
    architectures=["Qwen2MoeForCausalLM"],
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=48,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    num_experts=4,
    num_experts_per_tok=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
MIXTRAL = {k: v for k, v in QWEN2_MOE.items() if "intermediate_size" not in k or k == "intermediate_size"}
MIXTRAL["architectures"] = ["MixtralForCausalLM"]
REFUSED = {
    # name: (config.json, the field the one-line error names)
    "mixtral-jitter": ({**MIXTRAL, "router_jitter_noise": 0.1}, "router_jitter_noise 0.1"),
    "mixtral-moe-intermediate-size": ({**MIXTRAL, "moe_intermediate_size": 24}, "moe_intermediate_size"),
    "qwen2-moe-no-shared-expert": (
        {**QWEN2_MOE, "shared_expert_intermediate_size": 0},
        "shared_expert_intermediate_size",
    ),
    "qwen2-moe-some-windowed": (
        {**QWEN2_MOE, "use_sliding_window": True, "max_window_layers": 2},
        "max_window_layers",
    ),
    "qwen3-dense-with-experts": ({**QWEN2_MOE, "architectures": ["Qwen3ForCausalLM"]}, "num_experts"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_moe_settings_are_refused_in_one_line(tmp_path, capsys, name):
    raw, field = REFUSED[name]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    line = error_of(capsys, "convert", "--from", "hf", "--to", "mlite", str(tmp_path / "hf"), str(tmp_path / "ml"))
    assert field in line and "not supported" in line, line
    assert not (tmp_path / "ml").exists()
