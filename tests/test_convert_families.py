"""HF Llama (llama3 / yarn rope, biases, tied), Qwen2, Qwen3 and Mistral <-> megatronlite, checked against
transformers itself (random models, no downloads). GPT-2 and plain Llama are in test_convert_hf.py."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import error_of  # noqa: E402
from test_convert_hf import VOCAB, hf_greedy, random_model, save_hf, tensors  # noqa: E402
from test_convert_train import assert_learns, train  # noqa: E402

from megatronlite import load_model  # noqa: E402
from megatronlite.cli import main  # noqa: E402
from megatronlite.convert import Options, convert, hf, read  # noqa: E402
from megatronlite.errors import UserError  # noqa: E402
from megatronlite.train.generate import generate_ids  # noqa: E402

SEQ = 40  # longer than every window and than llama3's / yarn's original context
LLAMA3 = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
YARN = dict(factor=4.0, original_max_position_embeddings=16)
CASES = {
    # name: (HF family, config kwargs, the features the import must read)
    "llama-llama3-gqa-untied": (
        "Llama",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "llama3", **LLAMA3, "rope_theta": 5e5},
        ),
        dict(arch="llama", rope_theta=5e5, rope_scaling={"type": "llama3", **LLAMA3}, tie_embeddings=False),
    ),
    "llama-yarn-biases-head-dim-tied": (
        "Llama",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "yarn", **YARN, "rope_theta": 1e4},
        ),
        dict(
            arch="llama",
            head_dim=16,
            tie_embeddings=True,
            bias=True,
            qkv_bias=True,
            rope_scaling={"type": "yarn", **YARN},
        ),
    ),
    "qwen2-qkv-bias-window-odd": (
        "Qwen2",
        dict(
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=9,
            max_window_layers=0,
        ),
        dict(arch="qwen2", qkv_bias=True, bias=False, sliding_window=9, qk_norm=False),
    ),
    "qwen3-head-dim-tied": (
        "Qwen3",
        dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=20, tie_word_embeddings=True),
        dict(arch="qwen3", qk_norm=True, head_dim=20, sliding_window=None, bias=False, qkv_bias=False),
    ),
    "mistral-window-head-dim": (
        "Mistral",
        dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=14, sliding_window=7),
        dict(arch="mistral", sliding_window=7, head_dim=14, qk_norm=False),
    ),
}


def family_model(case: str):
    family, kwargs, _ = CASES[case]
    defaults = dict(num_hidden_layers=2, intermediate_size=72, vocab_size=VOCAB, max_position_embeddings=64)
    cfg = getattr(transformers, f"{family}Config")(**{**defaults, "rms_norm_eps": 1e-5, **kwargs})
    return random_model(getattr(transformers, f"{family}ForCausalLM"), cfg)


def imported(tmp_path, case: str):
    """(the transformers model, our model converted from it)."""
    model = family_model(case)
    convert("hf", "mlite", save_hf(model, tmp_path / "hf"), tmp_path / "ml", Options())
    return model, load_model(tmp_path / "ml")


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_reads_features_and_matches_transformers(tmp_path, case):
    """Every feature comes from the config's keys; logits within 1e-4 of transformers' on a sequence longer
    than the window and the original rope context, and the same greedy continuation past the window."""
    theirs, ours = imported(tmp_path, case)
    expected = CASES[case][2]
    assert {k: getattr(ours.cfg, k) for k in expected} == expected
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    prompt = ids[0, :5].tolist()
    assert generate_ids(ours, prompt, 16) == hf_greedy(theirs, prompt, 16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact_and_verifies(tmp_path, capsys, case):
    """Back to HF (with `--verify` against transformers): the same architecture, tensors equal bit for bit,
    and a config that makes transformers compute the same logits exactly (windows, rope, biases survive)."""
    theirs, _ = imported(tmp_path, case)
    main(["convert", "--from", "mlite", "--to", "hf", str(tmp_path / "ml"), str(tmp_path / "back"), "--verify"])
    out = capsys.readouterr().out
    assert "agrees (2/2 prompts identical)" in out, out
    architecture = f"{CASES[case][0]}ForCausalLM"
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [architecture]
    back, info = getattr(transformers, architecture).from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    before, after = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, theirs(ids).logits)


def test_export_chooses_the_family_by_features(tmp_path):
    """A llama preset with qk_norm is written as Qwen3 (the one family holding it); a model no family
    expresses is refused before anything is written."""
    imported(tmp_path, "qwen3-head-dim-tied")
    ckpt = read("mlite", tmp_path / "ml", Options())
    ckpt.cfg.model = dataclasses.replace(ckpt.cfg.model, arch="llama")
    hf.write(ckpt, tmp_path / "as-llama", Options())
    assert json.loads((tmp_path / "as-llama" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    ckpt.cfg.model = dataclasses.replace(ckpt.cfg.model, qkv_bias=True)
    with pytest.raises(UserError, match=r"no HF architecture .* Qwen3ForCausalLM lacks model.qkv_bias, bias"):
        hf.write(ckpt, tmp_path / "none", Options())
    assert not (tmp_path / "none").exists()


LLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=48,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
REFUSED = {
    # name: (config.json changes, the field the one-line error names)
    "softcap": (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    "linear-rope": (dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_type 'linear'"),
    "dynamic-rope": (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)), "rope_type 'dynamic'"),
    "yarn-mscale": (dict(rope_parameters={"rope_type": "yarn", **YARN, "mscale": 0.7}), "rope_parameters.mscale"),
    "partial-rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "attention-bias-alone": (dict(attention_bias=True), "attention_bias"),
    "moe": (dict(architectures=["MistralForCausalLM"], num_local_experts=8), "num_local_experts"),
    "qwen3-o-proj-bias": (dict(architectures=["Qwen3ForCausalLM"], attention_bias=True), "attention_bias"),
    "qwen2-some-windowed": (
        dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, max_window_layers=1),
        "max_window_layers",
    ),
    "mixed-layer-types": (
        dict(architectures=["Qwen2ForCausalLM"], layer_types=["full_attention", "sliding_attention"]),
        "layer_types",
    ),
    "unknown-architecture": (dict(architectures=["Phi3ForCausalLM"]), "Phi3ForCausalLM"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_features_are_refused_in_one_line(tmp_path, capsys, name):
    changes, field = REFUSED[name]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **changes}))
    line = error_of(capsys, "convert", "--from", "hf", "--to", "mlite", str(tmp_path / "hf"), str(tmp_path / "ml"))
    assert field in line and "not supported" in line, line
    assert not (tmp_path / "ml").exists()


@pytest.mark.slow
def test_converted_qwen3_trains_alike_at_tp2_and_pp2(tmp_path, corpus):
    """qk-norm's weight gradient is a partial sum over TP (each rank norms its own heads): a converted Qwen3
    continues training in tp2 and in pp2 with the losses of one process."""
    cfg = transformers.Qwen3Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=128,
        vocab_size=257,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    converted = tmp_path / "converted"
    convert("hf", "mlite", tmp_path / "hf", converted, Options())
    one = tmp_path / "one"
    reference = assert_learns(train(1, converted, one, corpus), converted, one)
    for layout in ("parallel.tensor=2", "parallel.pipeline=2"):
        run = tmp_path / layout.replace("=", "")
        done = train(2, converted, run, corpus, layout)
        assert assert_learns(done, converted, run) == pytest.approx(reference, rel=1e-5), layout


@pytest.mark.parametrize("case", ["llama-llama3-gqa-untied", "qwen2-qkv-bias-window-odd"])
def test_packed_documents_match_transformers_on_each_document_alone(tmp_path, case):
    """data.document_mask against transformers: three documents packed in one sequence (each ended by the
    end-of-document token, the last cut short) give, at every position, the logits transformers gives for
    that position's document run alone (positions restart, no attention across documents)."""
    from megatronlite.data.documents import document_ids, document_positions
    from megatronlite.models.gpt import GPTModel, Packing

    theirs, ours = imported(tmp_path, case)
    eod = 0
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (11, 17, 12)]
    docs = [torch.cat([docs[0], torch.tensor([eod])]), torch.cat([docs[1], torch.tensor([eod])]), docs[2]]
    packed = torch.cat(docs)[None]
    documents = document_ids(packed, eod)
    with torch.no_grad():
        got = GPTModel.forward(ours, packed, None, Packing(documents, document_positions(documents)))
        want = torch.cat([theirs(doc[None]).logits for doc in docs], dim=1)
    assert (got - want).abs().max().item() < 1e-4
