"""`megatronlite plan`: model-state bytes equal what the real code allocates, activations within 10% of what
autograd keeps for backward, FLOPs per token as Narayanan et al. (2021), the command's output and errors."""

import gc

import pytest
import torch
from helpers import error_of

from megatronlite import config
from megatronlite.config import ModelConfig
from megatronlite.models.counting import flops_per_token
from megatronlite.parallel.mesh import ROLES, _lines, rank_grid
from megatronlite.plan.layout import mesh_at
from megatronlite.plan.measure import allocated_states
from megatronlite.plan.memory import model_states, stage_saved
from megatronlite.train.trainer import run_options


def tiny(*sets: str) -> config.Config:
    base = ["model.num_layers=4", "model.vocab_size=301", "train.seq_len=64", "model.max_seq_len=64"]
    return config.load("configs/demo.yaml", [*base, "train.micro_batch_size=2", "train.global_batch_size=8", *sets])


@pytest.mark.parametrize("world,tp,pp,cp", [(8, 2, 2, 1), (8, 1, 2, 2), (4, 4, 1, 1)])
def test_mesh_at_groups_are_build_mesh_groups(world, tp, pp, cp):
    cfg = tiny(f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.context={cp}")
    grid = rank_grid(world, tp, pp, cp)
    for rank in range(world):
        mesh = mesh_at(cfg, world, rank)
        for role, axes in ROLES.items():
            line = next(line for line in _lines(grid, axes) if rank in line)
            assert mesh.role(role).ranks == tuple(line) and mesh.role(role).rank == line.index(rank)


@pytest.mark.parametrize(
    "world,sets",
    [
        (2, ["parallel.tensor=2"]),
        (2, ["parallel.pipeline=2"]),
        (2, ["parallel.distributed_optimizer=true", "parallel.bucket_mb=0.05"]),
        (2, ["parallel.zero_stage=2", "parallel.bucket_mb=0.05"]),
        (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]),
        (2, ["model.moe.num_experts=4", "parallel.expert=2"]),
        (4, ["model.moe.num_experts=4", "parallel.expert=2", "parallel.distributed_optimizer=true"]),
    ],
    ids=["tp2", "pp2", "dp2-zero1", "dp2-zero2", "tp2xpp2-sp", "moe-ep2", "moe-ep2xdp2-zero1"],
)
def test_model_state_bytes_equal_allocated(world, sets):
    cfg = tiny("model.tie_embeddings=true", *sets)
    for rank in range(world):
        states = model_states(cfg, world, rank)
        predicted = {"weights": states.weights, "grads": states.grads, "optimizer": states.optimizer}
        assert predicted == allocated_states(cfg, world, rank), rank


def _saved_bytes(model, tokens, labels) -> int:
    """Bytes one forward leaves for backward: tensors autograd saved (hooks) and tensors Python still holds
    (a checkpoint's inputs), unique storages, minus what existed before the forward."""

    def live() -> dict[int, int]:
        out = {}
        for obj in gc.get_objects():
            # plain tensors only: not parameters, nor the fake tensors an earlier torch.compile left for gc
            if type(obj) is torch.Tensor and obj.device.type == "cpu":
                out[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return out

    before = live()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, labels)
    held = {**saved, **live()}
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in held.items() if ptr not in before and ptr not in owned)
    del loss
    return total


GPT2 = ["model.arch=gpt2", "model.num_kv_heads=8", "model.ffn_hidden_size=512"]
MOE = [  # every other layer a mixture of 4 experts with the auxiliary losses and a shared expert
    "model.moe.num_experts=4",
    "model.moe.ffn_hidden_size=96",
    "model.moe.layer_freq=2",
    "model.moe.aux_loss_coeff=0.01",
    "model.moe.shared_expert_ffn_hidden_size=64",
]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize(
    "sets",
    [[], ["train.precision=bf16"], GPT2, MOE, [*MOE, "train.precision=bf16"]],
    ids=["llama", "llama-bf16", "gpt2", "moe", "moe-bf16"],
)
def test_activation_bytes_within_10_percent_of_saved(recompute, sets):
    from megatronlite.models.gpt import GPTModel
    from megatronlite.models.init import init_parameters

    size = ["train.seq_len=128", "model.max_seq_len=128", "model.hidden_size=128"]
    cfg = tiny(f"train.recompute={recompute}", *size, *sets)
    options = run_options(cfg, torch.device("cpu"))
    model = GPTModel(cfg.model, options=options)
    init_parameters(model, cfg.model, 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len))
    half = cfg.train.precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        model(tokens, tokens)  # the rotary tables, made once per sequence length
        measured = _saved_bytes(model, tokens, tokens)
    predicted = stage_saved(cfg, options, list(range(cfg.model.num_layers)), first=True, last=True)
    if recompute != "full":  # the GEMMs saved autocast's weight copies (under full recompute only its cache,
        predicted += model_states(cfg, 1, 0).weight_copies  # which the hooks cannot see, holds them)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_flops_per_token_is_megatrons_for_gpt3_shapes():
    """Narayanan et al.'s formula with the causal mask's half of the scores, as Megatron-LM counts since 2025
    (s / 2 keys per query; we count the diagonal whole: (s + 1) / 2)."""
    layers, h, s, v = 96, 12288, 2048, 51200  # GPT-3 175B (Narayanan et al. 2021, table 1 shapes)
    cfg = ModelConfig(arch="gpt2", num_layers=layers, hidden_size=h, num_heads=96, vocab_size=v, max_seq_len=s)
    assert cfg.ffn_size == 4 * h
    megatron = 72 * layers * h**2 * (1 + s / (12 * h) + v / (12 * layers * h))  # per token: the paper's / (B s)
    assert flops_per_token(cfg, s) == pytest.approx(megatron + 6 * layers * h, rel=1e-12)


def test_plan_prints_the_layouts_that_fit(capsys):
    from megatronlite.cli import main

    main(["plan", "configs/demo.yaml", "--gpus", "8", "--top", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["layout", "mem/GPU", "w+g+opt"]
    assert len(out[2:5]) == 3 and all(line.startswith("tp") for line in out[2:5])
    assert "faster than" in out[5] or "ties" in out[5]


def test_plan_searches_expert_parallelism_for_moe_models(capsys):
    from megatronlite.cli import main

    moe = ["--set", "model.moe.num_experts=8", "--set", "model.moe.top_k=2"]
    main(["plan", "configs/demo.yaml", "--gpus", "8", "--json", *moe])
    import json

    layouts = json.loads(capsys.readouterr().out)["layouts"]
    eps = {r["layout"]["ep"] for r in layouts}
    assert eps == {1, 2, 4, 8}  # every divisor of dp x cp that divides the experts
    with_ep = next(r for r in layouts if r["layout"]["ep"] == 8 and r["layout"]["dp"] == 8)
    assert with_ep["step_seconds"]["ep"] > 0
    assert all(r["step_seconds"]["ep"] == 0 for r in layouts if r["layout"]["ep"] == 1)


def test_plan_bad_gpus_is_one_line(capsys):
    assert "--gpus must be a positive number" in error_of(capsys, "plan", "configs/demo.yaml", "--gpus", "0")
    assert "--gpu 'tpu'" in error_of(capsys, "plan", "configs/demo.yaml", "--gpus", "8", "--gpu", "tpu")


@pytest.mark.parametrize("top", ["0", "-1"])
def test_plan_top_below_one_is_refused(capsys, top):
    """`--top -1` printed all but the last layout (a slice), `--top 0` none."""
    line = error_of(capsys, "plan", "configs/demo.yaml", "--gpus", "8", "--top", top)
    assert f"--top must be a positive number of layouts to show, got {top}" in line


def _finished_run(tmp_path, cfg: config.Config, tokens_per_sec: float, gpus: int, peak: float):
    """A run directory as training leaves it: its resolved config and a few logged steps."""
    import json

    import yaml

    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    records = [{"step": s, "tokens_per_sec": tokens_per_sec * (0.5 if s == 1 else 1)} for s in range(1, 6)]
    for r in records:
        r["mfu"] = r["tokens_per_sec"] / gpus * fpt / peak  # as train/run_log.py computes it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_calibration_fits_the_efficiency_that_predicts_the_run(tmp_path, capsys):
    """A run that went at the speed the planner predicts at efficiency 0.4 calibrates to 0.4 (its warm-up step
    left out); afterwards the planner's MFU for that layout is the run's logged MFU."""
    import json

    from megatronlite.errors import UserError
    from megatronlite.plan import calibrate, hardware
    from megatronlite.plan.estimate import Planner
    from megatronlite.plan.layout import layout_of

    cfg, gpus, hw = tiny("parallel.tensor=2", "parallel.pipeline=2"), 8, hardware.gpu("h100")
    layout = layout_of(cfg, gpus)
    speed = Planner(cfg, gpus, 8, hw, 0.4).estimate(layout).tokens_per_sec
    run = _finished_run(tmp_path, cfg, speed, gpus, hw.peak_flops)
    assert calibrate.fit(run, gpus, 8, hw) == pytest.approx(0.4, rel=1e-9)
    store = tmp_path / "plan.json"
    calibrate.store("h100", 0.4, run, store)
    eff, source = hardware.efficiency("h100", store)
    assert eff == 0.4 and source == f"calibrated from {run}"
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["mfu"]
    assert Planner(cfg, gpus, 8, hw, eff).estimate(layout).mfu == pytest.approx(logged, rel=1e-9)
    with pytest.raises(UserError, match="faster than these 8 devices at their peak"):
        calibrate.fit(_finished_run(tmp_path / "fast", cfg, speed * 10, gpus, hw.peak_flops), gpus, 8, hw)
    (tmp_path / "bad").mkdir()
    assert "config.yaml: not found" in error_of(capsys, "plan", str(tmp_path / "bad"), "--calibrate", "--gpus", "8")
