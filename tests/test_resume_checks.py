"""What a resume takes back beyond weights and Adam (tests/test_checkpoint_layouts.py): the checkpoint is checked
against the model before anything is read, a run started from a path goes on from its own checkpoints, and the
state of the guards, Adam's step count and the data's sample order survive it."""

import json
import shutil

import pytest
from helpers import error_of, read_metrics, resume_from, set_args, tiny_overrides, train

from megatronlite.checkpoint import store
from megatronlite.cli import main


def train_args(run, overrides) -> list[str]:
    return ["train", "configs/demo.yaml", "--run-dir", str(run), *set_args(overrides)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """A 3-layer llama with an untied output layer, trained 8 steps (checkpoints step_0000004 and step_0000008)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(run, tiny_overrides(corpus, run, **{"model.num_layers": 3, "model.tie_embeddings": "false"}))
    return run


@pytest.mark.parametrize(
    "change, stored, differs",
    [
        ({"model.num_layers": 2}, "model.layers.2.attention.qkv.weight", "model.num_layers 3, here 2"),
        ({"model.tie_embeddings": "true"}, "model.output.weight", "model.tie_embeddings False, here True"),
    ],
)
def test_a_checkpoint_holding_what_the_model_lacks_is_refused(tmp_path, corpus, saved, capsys, change, stored, differs):
    run = tmp_path / "run"
    resume_from(saved, "step_0000004", run)
    sets = tiny_overrides(corpus, run, **{"model.num_layers": 3, "model.tie_embeddings": "false", **change})
    error = error_of(capsys, *train_args(run, sets))
    assert f"{stored} stored, config has no place for it" in error, error
    assert differs in error, error
    assert store.latest_complete(run / "checkpoints").name == "step_0000004"  # nothing written over it
    assert not (run / "config.yaml").exists()  # nor a config.yaml of a model its checkpoints do not hold


def test_a_setting_no_tensor_shows_is_changed_with_a_warning(tmp_path, corpus, saved, capsys):
    run = tmp_path / "run"
    resume_from(saved, "step_0000004", run)
    sets = {"model.num_layers": 3, "model.tie_embeddings": "false", "model.rope_theta": 500000.0, "train.steps": 5}
    main(train_args(run, tiny_overrides(corpus, run, **sets)))
    out = capsys.readouterr().out
    assert "was saved with another model config: model.rope_theta 10000.0, here 500000.0" in out, out
    assert read_metrics(run)[-1]["step"] == 5


@pytest.mark.parametrize("start", ["path", "null"])
def test_a_run_goes_on_from_its_own_checkpoints_however_it_started(tmp_path, corpus, saved, capsys, monkeypatch, start):
    """`checkpoint.load: PATH` (a checkpoint) or `null` (fresh weights) starts a run; once the run has a checkpoint,
    a restart (a requeue, a sweep's re-run, the same command again) goes on from it, never back to its start, and
    the losses are the uninterrupted run's."""
    sets = {"model.num_layers": 3, "model.tie_embeddings": "false", "checkpoint.load": str(saved), "train.steps": 12}
    sets |= {"checkpoint.interval": 2} | ({"checkpoint.load": "null"} if start == "null" else {})
    whole, run = tmp_path / "whole", tmp_path / "run"
    train(whole, tiny_overrides(corpus, whole, **sets))
    monkeypatch.setenv("MEGATRONLITE_FAULT", "step:11")
    with pytest.raises(RuntimeError, match="injected fault"):
        train(run, tiny_overrides(corpus, run, **sets))
    monkeypatch.delenv("MEGATRONLITE_FAULT")
    capsys.readouterr()
    train(run, tiny_overrides(corpus, run, **sets))
    assert f"resumed from {run / 'checkpoints' / 'step_0000010'} at step 10" in capsys.readouterr().out
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == [(m["step"], m["loss"]) for m in read_metrics(whole)]


def test_adams_step_count_survives_a_resume_in_another_precision(tmp_path, corpus):
    """fp16 steps skipped on overflow are not Adam's; resumed in fp32, the count goes on from the checkpoint's."""
    run = tmp_path / "run"
    fp16 = {"train.steps": 4, "train.precision": "fp16", "optim.initial_loss_scale": 2.0**40, "train.device": "cpu"}
    train(run, tiny_overrides(corpus, run, **fp16))
    meta = store.read_meta(store.find_step_dir(run))
    assert meta["optimizer_steps"] < 4, meta  # the first steps overflowed
    train(run, tiny_overrides(corpus, run, **{"train.steps": 6, "checkpoint.interval": 6}))
    after = store.read_meta(store.find_step_dir(run))
    assert (after["step"], after["optimizer_steps"]) == (6, meta["optimizer_steps"] + 2), (meta, after)


def test_the_spike_guard_judges_a_resumed_run_by_the_same_recent_losses(tmp_path, corpus, monkeypatch):
    """A spike at step 9 stops the uninterrupted run; resumed from step 6 (two losses since: too few to judge by
    without the saved ones) it stops there too."""
    monkeypatch.setenv("MEGATRONLITE_FAULT", "spike:9")
    sets = {"train.steps": 12, "checkpoint.interval": 6, "train.loss_spike_factor": 3.0}
    for run in (tmp_path / "whole", tmp_path / "resumed"):
        if run.name == "resumed":
            resume_from(tmp_path / "whole", "step_0000006", run)
        with pytest.raises(SystemExit) as stopped:
            main(train_args(run, tiny_overrides(corpus, run, **sets)))
        assert stopped.value.code == 2
        assert read_metrics(run)[-1]["step"] == 8, run


def test_a_resume_that_reorders_the_data_says_so(tmp_path, corpus, capsys):
    """A train split of one document holds ~78 samples: 8 steps of 4 fit one epoch, 24 need two, and with the
    second epoch megatron-core's order changes from the first sample on: the resume warns; 9 steps do not."""
    run = tmp_path / "run"
    one_doc = {"data.split": "1,99"}
    train(run, tiny_overrides(corpus, run, **one_doc))
    warning = "the training data's sample order is not the checkpoint's"
    for steps, warned in ((9, False), (24, True)):
        capsys.readouterr()
        train(run, tiny_overrides(corpus, run, **one_doc, **{"train.steps": steps, "checkpoint.interval": 100}))
        assert (warning in capsys.readouterr().out) == warned, steps
    meta = json.loads((store.find_step_dir(run) / "meta.json").read_text())
    assert meta["sample_order"] and meta["consumed_samples"] == 24 * 4


def _committed(root, *steps):
    for step in steps:
        (root / store.step_name(step)).mkdir(parents=True)
        (root / store.step_name(step) / store.META).write_text("{}")


def test_going_back_keeps_the_abandoned_steps_out_of_the_retention(tmp_path):
    """A user who went back to step 10 (by `latest`) saves step 15: the kept steps are this history's, and the
    abandoned 20 and 30 stay (not counted, not deleted) until the run saves those steps again."""
    root = tmp_path / "checkpoints"
    _committed(root, 5, 10, 20, 30)
    store.temp_dir(root, 15).mkdir()
    store.commit(root, 15, {}, "", keep=2, keep_every=0)
    assert [p.name for p in store.step_dirs(root)] == [store.step_name(s) for s in (10, 15, 20, 30)]
    assert (root / store.LATEST).read_text() == store.step_name(15)


def test_steps_past_seven_digits_sort_by_number(tmp_path):
    root = tmp_path / "checkpoints"
    _committed(root, 9_999_999, 10_000_000)
    assert [store.step_of(p) for p in store.step_dirs(root)] == [9_999_999, 10_000_000]
    store.temp_dir(root, 10_000_001).mkdir()
    store.commit(root, 10_000_001, {}, "", keep=2, keep_every=0)
    assert [store.step_of(p) for p in store.step_dirs(root)] == [10_000_000, 10_000_001]


def test_going_back_by_latest_replays_the_steps_after_it(tmp_path, corpus, saved, capsys):
    """The README's way back: `latest` names an earlier step; the run goes on from it as the first run did."""
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    (run / "checkpoints" / store.LATEST).write_text("step_0000004")
    capsys.readouterr()
    train(run, tiny_overrides(corpus, run, **{"model.num_layers": 3, "model.tie_embeddings": "false"}))
    assert f"resumed from {run / 'checkpoints' / 'step_0000004'} at step 4" in capsys.readouterr().out
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == [(m["step"], m["loss"]) for m in read_metrics(saved)]


def test_a_resume_with_other_blend_weights_says_so(tmp_path, corpus, capsys):
    """New weights interleave the sources otherwise from the first sample, even where each source's index stays."""
    run = tmp_path / "run"
    blend = lambda a, b: {"data.sources": f"[{{path: {corpus}, weight: {a}}}, {{path: {corpus}, weight: {b}}}]"}  # noqa: E731
    train(run, tiny_overrides(corpus, run, **blend(1, 1), **{"train.steps": 4}))
    warning = "the training data's sample order is not the checkpoint's"
    for steps, weights, warned in ((6, (1, 1), False), (8, (1, 3), True)):
        capsys.readouterr()
        train(run, tiny_overrides(corpus, run, **blend(*weights), **{"train.steps": steps}))
        assert (warning in capsys.readouterr().out) == warned, weights
