"""`convert --from megatron` / `--to megatron` carry the run, not only the weights: the iteration, the consumed
samples, Adam's moments and step count, the fp32 masters.

The megatron side is megatron-core 0.16's own: its GPTModel (local layers) wrapped in its
DistributedDataParallel and DistributedOptimizer, on CPU under gloo with two data-parallel ranks (the shims
of tests/test_convert_megatron.py plus `_optimizer_shims`), trained a few iterations with Megatron-LM's LR
scheduler and saved by `dist_checkpointing` as Megatron-LM saves: with --dist-ckpt-optim-fully-reshardable
(`fully_reshardable`, model space) and without it (`dp_reshardable`, bucket space). What we write is loaded
back the way Megatron-LM's load_checkpoint does: content metadata, model and optimizer sharded state dicts,
`optimizer.load_state_dict`, and its OptimizerParamScheduler checking the scheduler state against the args.

The references come from megatron-core in the training processes (its optimizer's own model-space export and
its torch AdamW's step count): trusted code, unlike anything read from the checkpoint directory.

`_worker` is the megatron-core side, run in the workers of a job (tests/helpers.py `workers`).
"""

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import conversion_model, error_of, set_args, workers

from megatronlite.checkpoint import store
from megatronlite.checkpoint.weights import expected_shapes, write_checkpoint_lazily
from megatronlite.cli import main
from megatronlite.convert import Options, convert, read
from megatronlite.convert.dcp_store import stored_tensors
from megatronlite.convert.megatron_legacy import FILE
from megatronlite.convert.megatron_names import mapping
from megatronlite.convert.model_state import run_config

ARCH = "llama"  # test_convert_megatron.ARCHS: 4 layers, GQA, SwiGLU, RMSNorm, rope, untied
VOCAB, PADDED = 257, 384  # the byte tokenizer's (the resumed run trains on bytes), padded to 128 as Megatron pads it
DP, MICRO, ITERATIONS, SEED = 2, 2, 4, 4321
SKIPPED = 1  # this iteration's update is skipped (as fp16's loss scaler skips one): Adam steps one time fewer
GBS = DP * MICRO
TRACKER = "latest_checkpointed_iteration.txt"
MOMENTS = ("exp_avg", "exp_avg_sq")
LAYOUT = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}  # Megatron-LM's metadata
TRAINING_ARGS = dict(  # Megatron-LM's args of the source run (iteration-based)
    seed=SEED,
    train_iters=10,
    global_batch_size=GBS,
    micro_batch_size=MICRO,
    lr=1e-2,
    min_lr=1e-3,
    lr_decay_style="cosine",
    lr_decay_iters=10,
    lr_warmup_iters=1,
    lr_warmup_fraction=None,
    lr_warmup_init=0.0,
    lr_wsd_decay_iters=None,
    lr_wsd_decay_style="exponential",
    weight_decay=0.1,
    start_weight_decay=0.1,
    end_weight_decay=0.1,
    weight_decay_incr_style="constant",
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_eps=1e-8,
    clip_grad=1.0,
    use_distributed_optimizer=True,
)


# --- without megatron-core: what we write and read back ------------------------------------------


def _native_training(tmp_path: Path, model, step: int = 7, adam_steps: int = 6, consumed: int = 56) -> dict:
    """A megatronlite training checkpoint with random weights and moments (distinct per tensor and kind)."""
    cfg = run_config(model, "src")
    gen = torch.Generator().manual_seed(0)
    values = {
        kind: {n: torch.randn(s, generator=gen) for n, s in expected_shapes(cfg).items()}
        for kind in ("model", *MOMENTS)
    }
    values["exp_avg_sq"] = {n: t.square() for n, t in values["exp_avg_sq"].items()}
    moments = {kind: values[kind].__getitem__ for kind in MOMENTS}
    write_checkpoint_lazily(tmp_path / "src", cfg, values["model"].__getitem__, step, moments, adam_steps, consumed)
    return values


def _stored(step_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    shapes = {k: s for k, (s, _) in stored_tensors(step_dir).items() if k.startswith(prefix)}
    out = {k: torch.empty(s) for k, s in shapes.items()}
    store.read_shards(step_dir, out)
    return {k.removeprefix(prefix): t for k, t in out.items()}


@pytest.mark.parametrize(
    "model,dtype",
    [
        (conversion_model("llama", num_layers=3), "bf16"),
        (conversion_model("gpt2", num_heads=2, num_kv_heads=2), "fp32"),
    ],
    ids=["llama-bf16", "gpt2-fp32"],
)
def test_training_checkpoint_round_trips_through_megatron(tmp_path, model, dtype, capsys):
    """Model tensors in the output dtype, the optimizer's in fp32: back in megatronlite, the weights are the fp32
    masters (`optimizer.state.param`), exactly, whatever the model tensors' dtype."""
    values = _native_training(tmp_path, model)
    args = ["convert", "--from", "mlite", "--to", "megatron", str(tmp_path / "src"), str(tmp_path / "meg")]
    main([*args, "--megatron-tp", "2", "--dtype", dtype])
    out = capsys.readouterr().out
    assert "carried the run: step 7, 56 consumed samples, Adam's moments and its step count 6" in out
    assert (tmp_path / "meg" / TRACKER).read_text() == "7"
    iteration = tmp_path / "meg" / "iter_0000007"
    common = torch.load(iteration / "common.pt", weights_only=False)
    assert common["iteration"] == 7 and common["args"].iteration == 7 and common["args"].consumed_train_samples == 56
    assert {g["step"] for g in common["optimizer"]["optimizer"]["param_groups"]} == {6.0}
    assert common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    assert common["opt_param_scheduler"]["num_steps"] == 56  # Megatron's scheduler counts samples
    shapes = stored_tensors(iteration)
    model_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for key, (shape, stored_dtype) in shapes.items():
        if not key.startswith("optimizer.") and "_extra_state" not in key:
            assert stored_dtype == model_dtype
            for kind in ("param", *MOMENTS):  # model space: shaped like the model tensor, fp32
                assert shapes[f"optimizer.state.{kind}.{key}"] == (shape, torch.float32)
    assert shapes["optimizer.state.exp_avg.embedding.word_embeddings.weight"][0][0] == 256  # 77 padded for TP 2

    convert("megatron", "mlite", tmp_path / "meg", tmp_path / "back", Options())
    step_dir = store.find_step_dir(tmp_path / "back")
    meta = store.read_meta(step_dir)
    assert (meta["step"], meta["consumed_samples"], meta["optimizer_steps"]) == (7, 56, 6)
    assert not meta.get("weights_only")
    for kind, prefix in (("model", "model."), ("exp_avg", "optim.exp_avg."), ("exp_avg_sq", "optim.exp_avg_sq.")):
        back = _stored(step_dir, prefix)
        assert back.keys() == values[kind].keys()
        assert all(torch.equal(back[n], t) for n, t in values[kind].items()), kind


def test_weights_only_leaves_the_run_behind(tmp_path):
    _native_training(tmp_path, conversion_model("llama"))
    convert("mlite", "megatron", tmp_path / "src", tmp_path / "meg", Options(weights_only=True))
    assert (tmp_path / "meg" / TRACKER).read_text() == "release"
    assert not any(k.startswith("optimizer.") for k in stored_tensors(tmp_path / "meg" / "release"))
    convert("megatron", "mlite", tmp_path / "meg", tmp_path / "back", Options())
    assert store.read_meta(store.find_step_dir(tmp_path / "back"))["weights_only"]


def test_legacy_output_cannot_carry_adam(tmp_path, capsys):
    _native_training(tmp_path, conversion_model("llama"))
    args = ["convert", "--from", "mlite", "--to", "megatron", str(tmp_path / "src"), str(tmp_path / "meg")]
    line = error_of(capsys, *args, "--megatron-format", "torch")
    assert "--megatron-format torch cannot carry Adam's state" in line and "--weights-only" in line
    assert not (tmp_path / "meg").exists()
    main([*args, "--megatron-format", "torch", "--weights-only"])
    assert (tmp_path / "meg" / TRACKER).read_text() == "release"


def test_legacy_optimizer_state_is_refused(tmp_path, capsys):
    """The legacy format's Adam state is indexed by position in the param groups: never guessed, refused."""
    values = _native_training(tmp_path, conversion_model("llama"))
    convert(
        "mlite", "megatron", tmp_path / "src", tmp_path / "meg", Options(megatron_format="torch", weights_only=True)
    )
    path = tmp_path / "meg" / "release" / "mp_rank_00" / FILE
    state = torch.load(path, weights_only=False)
    adam = {i: {"step": torch.tensor(6.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)} for i in range(2)}
    state["optimizer"] = {"optimizer": {"state": adam, "param_groups": [{"params": [0, 1], "wd_mult": 1.0}]}}
    torch.save(state, path)
    args = ["convert", "--from", "megatron", "--to", "mlite", str(tmp_path / "meg"), str(tmp_path / "out")]
    line = error_of(capsys, *args)
    assert "mp_rank_00/model_optim_rng.pt: holds Megatron's optimizer state in the legacy torch format" in line
    assert "--weights-only" in line and not (tmp_path / "out").exists()
    main([*args, "--weights-only"])
    back = read("mlite", tmp_path / "out", Options())
    assert back.training is None
    assert all(torch.equal(back.get(n), t) for n, t in values["model"].items())


# --- against megatron-core ----------------------------------------------------------------------


def _megatron(scenario: str, *paths: Path) -> None:
    pytest.importorskip("megatron.core")
    workers(_worker, DP, scenario, *map(str, paths))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """megatron-core's training checkpoints (`fully_reshardable/`, `dp_reshardable/`) and `reference.pt`."""
    out = tmp_path_factory.mktemp("megatron")
    _megatron("save", out)
    return out


def _ours(model, reference: dict) -> dict[str, dict[str, torch.Tensor]]:
    """megatron-core's model-space state (by per-layer names) in our names: the weights' mapping moves moments too."""
    rules = mapping(model, PADDED)
    names = expected_shapes(run_config(model, "x"))
    return {kind: {n: rules.ours(n, reference[kind].__getitem__) for n in names} for kind in ("param", *MOMENTS)}


def _corpus(prefix: Path) -> None:
    """A tiny byte-token corpus (.bin/.idx) for the resumed run."""
    from megatronlite.data.indexed import IndexedWriter

    rng = np.random.default_rng(0)
    with IndexedWriter(prefix) as writer:
        for _ in range(40):
            writer.add_document(np.append(rng.integers(0, 256, 60), 256))


@pytest.fixture(scope="module")
def resumed(source, tmp_path_factory):
    """`convert --from megatron` of the fully reshardable checkpoint, then `train` from it for one step; what the
    trainer held right after resuming, and the run directory (its checkpoint at the source's train_iters, written by
    `train`)."""
    out = tmp_path_factory.mktemp("resumed")
    args = ["convert", "--from", "megatron", "--to", "mlite", str(source / "fully_reshardable"), str(out / "run")]
    main([*args, "--vocab-size", str(VOCAB)])
    _corpus(out / "bytes")
    from megatronlite.train import checkpointing

    seen = {}
    maybe_resume = checkpointing.maybe_resume

    def capture(trainer) -> None:
        maybe_resume(trainer)
        seen.update(step=trainer.step, consumed_samples=trainer.consumed_samples)
        seen["adam_steps"] = {float(s["step"]) for s in trainer.engine.optimizer.state.values()}
        seen["pieces"] = {p.key: p.local.detach().clone() for p in trainer.state_tensors(True)}

    sets = {  # the run's length, batches and LR schedule are the source's (its args): only data and logging here
        "checkpoint.load": out / "run",
        "data.sources": f"[{{path: {out / 'bytes'}}}]",
        "data.cache_dir": out / "cache",
        "train.seq_len": 16,
        "train.eval_interval": 0,
        "logging.interval": 1,
        "checkpoint.interval": 0,
    }
    checkpointing.maybe_resume = capture
    try:
        main(
            [
                "train",
                str(out / "run" / "config.yaml"),
                "--run-dir",
                str(out / "train"),
                *set_args(f"{k}={v}" for k, v in sets.items()),
            ]
        )
    finally:
        checkpointing.maybe_resume = maybe_resume
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return seen, metrics, out


@pytest.mark.slow
def test_megatron_core_run_resumes_in_train(source, resumed):
    """The trainer resumes at megatron-core's iteration and data position, with its Adam state exactly."""
    seen, metrics, out = resumed
    reference = torch.load(source / "reference.pt", weights_only=True)
    ckpt = read("megatron", source / "fully_reshardable", Options(vocab_size=VOCAB))
    assert ckpt.seed == SEED and ckpt.training.optimizer_steps_from == "the optimizer's param_groups step"
    expected = _ours(ckpt.cfg.model, reference)
    assert expected["exp_avg"]["layers.0.attention.qkv.weight"].abs().min() > 0  # trained: moments everywhere
    assert (seen["step"], seen["consumed_samples"]) == (ITERATIONS, ITERATIONS * GBS)
    assert seen["adam_steps"] == set(reference["adam_steps"]) == {float(ITERATIONS - 1)}  # one update skipped
    held = {kind: {} for kind in ("param", *MOMENTS)}
    for key, t in seen["pieces"].items():
        kind, name = ("param", key.removeprefix("model.")) if key.startswith("model.") else key[6:].split(".", 1)
        held[kind][name] = t
    for kind, tensors in expected.items():
        assert held[kind].keys() == tensors.keys()
        assert all(torch.equal(held[kind][n], t) for n, t in tensors.items()), kind
    # and it trains on from there, to the source's end, at megatron-core's learning rate for each iteration
    steps = TRAINING_ARGS["train_iters"]
    assert [(m["step"], m["consumed_samples"]) for m in metrics] == [
        (i + 1, (i + 1) * GBS) for i in range(ITERATIONS, steps)
    ]
    assert [m["lr"] for m in metrics] == pytest.approx([_megatron_lr(i) for i in range(ITERATIONS, steps)], rel=1e-9)
    assert all(np.isfinite(m["loss"]) for m in metrics)


def _megatron_lr(iteration: int) -> float:
    """The learning rate megatron-core's scheduler gives the update after `iteration` completed iterations."""
    import argparse

    holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = _scheduler(holder, argparse.Namespace(**TRAINING_ARGS))
    scheduler.step(increment=iteration * GBS)  # its steps count samples
    return holder.param_groups[0]["lr"]


@pytest.mark.slow
def test_round_trip_and_megatron_core_loads_it(source, resumed, tmp_path):
    """A megatronlite training checkpoint -> megatron -> megatronlite is bit-exact, and megatron-core's distributed
    optimizer (dp2) loads the megatron side: our moments, step, iteration and data position."""
    _, _, out = resumed
    step_dir = store.find_step_dir(out / "train")
    meta = store.read_meta(step_dir)
    steps = TRAINING_ARGS["train_iters"]
    assert (meta["step"], meta["optimizer_steps"]) == (steps, steps - SKIPPED)  # Adam one behind: the source's skip
    convert("mlite", "megatron", out / "train", tmp_path / "meg", Options())
    assert (tmp_path / "meg" / TRACKER).read_text() == str(steps)
    convert("megatron", "mlite", tmp_path / "meg", tmp_path / "back", Options(vocab_size=VOCAB))
    back_meta = store.read_meta(store.find_step_dir(tmp_path / "back"))
    for key in ("step", "consumed_samples", "optimizer_steps"):
        assert back_meta[key] == meta[key], key
    ours = {prefix: _stored(step_dir, prefix) for prefix in ("model.", "optim.exp_avg.", "optim.exp_avg_sq.")}
    for prefix, tensors in ours.items():
        back = _stored(store.find_step_dir(tmp_path / "back"), prefix)
        assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items()), prefix

    _megatron("load", tmp_path / "meg", tmp_path / "loaded.pt")
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded["iteration"] == meta["step"] and loaded["consumed_train_samples"] == meta["consumed_samples"]
    assert loaded["scheduler_num_steps"] == meta["consumed_samples"]
    assert loaded["adam_steps"] == [float(meta["optimizer_steps"])]
    assert loaded["sharding_type"] == "fully_reshardable"
    got = _ours(read("mlite", out / "train", Options()).cfg.model, loaded)
    for kind, prefix in (("param", "model."), ("exp_avg", "optim.exp_avg."), ("exp_avg_sq", "optim.exp_avg_sq.")):
        assert all(torch.equal(got[kind][n], t) for n, t in ours[prefix].items()), kind


@pytest.mark.slow
def test_bucket_space_is_refused_unless_weights_only(source, tmp_path, capsys):
    args = ["convert", "--from", "megatron", "--to", "mlite", str(source / "dp_reshardable"), str(tmp_path / "out")]
    line = error_of(capsys, *args, "--vocab-size", str(VOCAB))
    assert "optimizer state is in megatron-core's 'dp_reshardable' layout" in line
    assert "--dist-ckpt-optim-fully-reshardable" in line and "--weights-only" in line
    assert not (tmp_path / "out").exists()
    main([*args, "--vocab-size", str(VOCAB), "--weights-only"])
    assert "carried the run" not in capsys.readouterr().out
    back = read("mlite", tmp_path / "out", Options())
    assert back.training is None
    expected = _ours(back.cfg.model, torch.load(source / "reference.pt", weights_only=True))["param"]
    assert all(torch.equal(back.get(n), t) for n, t in expected.items())  # fp32: the model tensors are the masters


# --- the megatron-core side (the job's workers) ---------------------------------------------------


def _optimizer_shims() -> None:
    """What megatron-core's DDP and distributed optimizer also ask of CUDA, on top of `_cpu_shims`: tensors made
    on "cuda" (flags, scalars) made on the CPU, `Tensor.type()` naming the CUDA type its dtype checks expect, and
    the allocator's cache."""
    import functools

    from test_convert_megatron import _cpu_shims

    _cpu_shims()

    def on_cpu(make):
        @functools.wraps(make)
        def made(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return make(*args, **kwargs)

        return made

    for name in ("tensor", "zeros", "empty", "ones", "full", "arange"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    type_of = torch.Tensor.type
    torch.Tensor.type = lambda self, *a, **k: (
        type_of(self, *a, **k) if a or k else type_of(self).replace("torch.", "torch.cuda.", 1)
    )
    torch.cuda.empty_cache = lambda: None
    # megatron-core >= 0.17's grad sync asks for the current stream, to wait on CUDA-graph events it has none of
    torch.cuda.current_stream = lambda *a, **k: None
    # Without apex or TE, megatron-core 0.16's distributed optimizer runs torch's AdamW, whose state holds a
    # per-parameter `step`; `fully_reshardable` keeps the step in the param groups instead, and on load
    # `load_state_dict` sets every parameter's step from them, then `_set_main_param_and_optimizer_states` copies
    # each key of the AdamW state from the loaded tensors, `step` included (a KeyError; apex/TE's FusedAdam keeps
    # no per-parameter step). Handed the step already set, the copy of that key changes nothing.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def with_step(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
        set_states(self, model_param, {**tensors, **({"step": state["step"]} if "step" in state else {})})

    DistributedOptimizer._set_main_param_and_optimizer_states = with_step


def _megatron_model():
    """megatron-core's model in its DDP, its distributed optimizer (torch AdamW inside: no apex or TE), the args."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from test_convert_megatron import _mcore_model

    model, args = _mcore_model(ARCH, seed=1, vocab=VOCAB)
    vars(args).update(TRAINING_ARGS)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    a = argparse.Namespace(**TRAINING_ARGS)
    config = OptimizerConfig(
        optimizer="adam",
        lr=a.lr,
        min_lr=a.min_lr,
        weight_decay=a.weight_decay,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        adam_eps=a.adam_eps,
        clip_grad=a.clip_grad,
        use_distributed_optimizer=True,
    )
    return model, ddp, get_megatron_optimizer(config, [ddp]), args


def _scheduler(optimizer, args):
    """Megatron-LM's get_optimizer_param_scheduler for iteration-based args (its steps count samples)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    decay = (args.lr_decay_iters or args.train_iters) * gbs
    warmup = args.lr_warmup_fraction * decay if args.lr_warmup_fraction is not None else args.lr_warmup_iters * gbs
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=False,  # Megatron-LM's default: checkpoint and args must agree
        override_opt_param_scheduler=False,
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def _model_space(optimizer, model) -> dict:
    """The optimizer's state as megatron-core exports it in model space (`fully_reshardable`, gathered over DP)
    by per-layer name, and its torch AdamW's step counts (a collective)."""
    metadata = {"distrib_optim_sharding_type": "fully_reshardable", **LAYOUT}
    exported = optimizer.sharded_state_dict(model.sharded_state_dict(metadata=metadata), metadata=metadata)
    out = {}
    for tensors in exported["param_state"].values():
        for kind, sharded in tensors.items():
            key = sharded.key.removeprefix(f"optimizer.state.{kind}.")
            first = sharded.build()[0] if hasattr(sharded, "build_fn") else sharded  # a factory: SwiGLU's fc1
            if first.prepend_axis_num:  # one layer of a stacked tensor
                key = key.replace("decoder.layers.", f"decoder.layers.{first.global_offset[0]}.", 1)
            out.setdefault(kind, {})[key] = sharded.data.detach().clone()
    steps = {float(s["step"]) for o in optimizer.chained_optimizers for s in o.optimizer.state.values()}
    return {**out, "adam_steps": sorted(steps)}


def _save(out: Path) -> None:
    """Train ITERATIONS iterations (each rank its own micro-batch; the update of one skipped) and save as
    Megatron-LM does, in both layouts."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from test_convert_megatron import _forward

    rank = dist.get_rank()
    model, ddp, optimizer, args = _megatron_model()
    scheduler = _scheduler(optimizer, args)
    for iteration in range(ITERATIONS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ids = torch.randint(0, VOCAB, (MICRO, 13), generator=torch.Generator().manual_seed(100 * iteration + rank))
        logits = _forward(ddp, ids[:, :-1])[..., :VOCAB]
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        ddp.finish_grad_sync()
        if iteration == SKIPPED:  # Megatron-LM still counts the iteration and its samples
            continue
        assert optimizer.step()[0]
        scheduler.step(increment=GBS)
    args.iteration, args.consumed_train_samples = ITERATIONS, ITERATIONS * GBS
    for layout in ("fully_reshardable", "dp_reshardable"):  # with and without --dist-ckpt-optim-fully-reshardable
        metadata = {"distrib_optim_sharding_type": layout, **LAYOUT}
        model_sd = model.sharded_state_dict(metadata=metadata)
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": ITERATIONS,
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, metadata=metadata),
            "opt_param_scheduler": scheduler.state_dict(),
        }
        directory = out / layout / f"iter_{ITERATIONS:07d}"
        directory.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(state, str(directory), content_metadata=metadata)
        if rank == 0:
            (out / layout / TRACKER).write_text(str(ITERATIONS))
    reference = _model_space(optimizer, model)
    if rank == 0:
        torch.save(reference, out / "reference.pt")


def _load(src: Path, out: Path) -> None:
    """Load `src` as Megatron-LM's load_checkpoint does into a fresh model and optimizer; export what they hold."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    model, _, optimizer, _ = _megatron_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # nothing of the source's weights left
    # megatron-core 0.16's DistributedOptimizer.state_dict() (run by its sharded_state_dict on load) asserts one step
    # count over its torch AdamW's state, which a fresh one (no apex or TE FusedAdam here) lacks until its first
    # step: zeros at step 0, all of it overwritten by the load
    for inner in optimizer.chained_optimizers:
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                zeros = torch.zeros_like(p)
                inner.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    directory = src / f"iter_{int((src / TRACKER).read_text()):07d}"
    common = dist_checkpointing.load_common_state_dict(str(directory))
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    model_sd = model.sharded_state_dict(metadata=metadata)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata),
    }
    loaded = dist_checkpointing.load(sharded, str(directory))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler = _scheduler(optimizer, loaded["args"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])  # asserts it agrees with the args
    exported = _model_space(optimizer, model)
    if dist.get_rank() == 0:
        exported.update(
            iteration=loaded["iteration"],
            consumed_train_samples=loaded["args"].consumed_train_samples,
            scheduler_num_steps=scheduler.num_steps,
            sharding_type=metadata["distrib_optim_sharding_type"],
        )
        torch.save(exported, out)


def _worker(scenario: str, *paths: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=3))
    _optimizer_shims()
    parallel_state.initialize_model_parallel(1, 1)
    {"save": _save, "load": _load}[scenario](*map(Path, paths))
    dist.barrier()
    dist.destroy_process_group()
