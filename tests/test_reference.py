"""megatronlite against an independent reference: transformers' model trained by a plain loop.

The layout tests compare every layout with the same trainer in one process, so a bug in what all
layouts share (loss averaging over micro-batches, clipping, the LR schedule, weight-decay groups,
the AdamW step) cancels out there. Here the reference shares none of that: the model is
transformers' LlamaForCausalLM / GPT2LMHeadModel (reached through the HF converter), and the loss,
accumulation, clipping, schedule and optimizer are written below from their definitions. Only the
starting weights (megatronlite's seeded init) and the sample order (megatronlite's data loader) are
taken from megatronlite, since those are its choices, not arithmetic a reference could redo.
"""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics, tiny_overrides, train, train_job
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from megatronlite import config as config_mod  # noqa: E402
from megatronlite.checkpoint.views import model_pieces  # noqa: E402
from megatronlite.checkpoint.weights import write_checkpoint  # noqa: E402
from megatronlite.convert import Options, convert  # noqa: E402
from megatronlite.data.loader import BatchLoader  # noqa: E402
from megatronlite.data.preprocess import preprocess  # noqa: E402
from megatronlite.data.run import build_run_data  # noqa: E402
from megatronlite.models.gpt import GPTModel  # noqa: E402
from megatronlite.models.init import init_parameters  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STEPS = 6
CLIP = 2.55  # between the gradient norms of these runs' steps (2.25 to 4.1): some steps clipped, some not
WORDS = "the cat sat on a mat while seven dogs ran to the red barn and back again in the cold rain".split()
HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A seeded synthetic corpus, byte-tokenized. Not conftest's (this repository's sources): CLIP sits
    between this data's gradient norms, which must not move whenever someone edits a source file."""
    out = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    with open(out / "docs.jsonl", "w") as f:
        for _ in range(200):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80))) + "."
            f.write(json.dumps({"text": text}) + "\n")
    return preprocess([str(out / "docs.jsonl")], str(out / "words"), append_eod=True, progress=False)[0]


def overrides(corpus: str, run_dir: Path, arch: str, init: Path) -> list[str]:
    """Tiny fp32 runs that exercise every shared part: 2 warmup steps then cosine decay, weight decay,
    clipping, and 4 micro-batches of accumulation in one process (2 per DP rank at DP 2)."""
    return tiny_overrides(
        corpus,
        run_dir,
        arch,
        **{
            "train.steps": STEPS,
            "train.global_batch_size": 8,
            "train.micro_batch_size": 2,
            "optim.warmup_steps": 2,
            "optim.min_lr": 3.0e-4,
            "optim.weight_decay": 0.1,
            "optim.clip_grad": CLIP,
            # Adam moves a weight by up to lr / eps times its gradient's rounding error (largest where the true
            # gradient is ~0: GPT-2's key bias, a feature unused by a batch). At eps 1e-8 that is 3e5 x ~1e-11,
            # so two exact fp32 runs (even the reference with 2 vs 4 micro-batches) differ by ~5e-6 in a few
            # weights; at 1e-5 the update is well conditioned and weights agree to ~1 ulp, so atol 1e-6 means
            # something.
            "optim.eps": 1.0e-5,
            "checkpoint.interval": 0,
            "checkpoint.load": str(init),
        },
    )


def write_initial_weights(cfg: config_mod.Config, out: Path) -> Path:
    """megatronlite's own seeded init (by global name from train.seed) as a weights-only checkpoint:
    the megatronlite run loads it, the reference gets it through the HF converter."""
    model = GPTModel(cfg.model)
    init_parameters(model, cfg.model, cfg.train.seed)
    pieces = model_pieces(dict(model.named_parameters()), model.mesh, for_save=True)
    write_checkpoint(out, cfg, ((p.key.removeprefix("model."), p.local) for p in pieces))
    return out


def lr_at_step(step: int, o: config_mod.OptimConfig, total: int) -> float:
    """Linear warmup to lr over `warmup_steps` (step 0 already at lr / warmup), then half a cosine to
    min_lr over the remaining steps (schedules.py's cosine, restated)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def hf_model(hf_dir: Path, arch: str) -> torch.nn.Module:
    """transformers' model from the converted directory; every weight must come from the file (a missing
    one would be silently re-initialized by transformers)."""
    model, info = HF_CLASSES[arch].from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.train()


def reference_run(cfg: config_mod.Config, hf_dir: Path, arch: str) -> dict:
    """A plain PyTorch training loop over megatronlite's batches; per step loss, grad norm, lr."""
    t, o = cfg.train, cfg.optim
    model = hf_model(hf_dir, arch)
    params = dict(model.named_parameters())  # a tied head is one parameter, listed once
    # megatronlite's rule: decay on matrices (linear, embedding and position tables), none on norms and biases
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    assert all(n.endswith("bias") or "norm" in n or ".ln_" in n for n, p in params.items() if p.ndim < 2)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    loader = BatchLoader(build_run_data(cfg).train, t.micro_batch_size, t.global_batch_size, 0, 1)
    out = {"loss": [], "grad_norm": [], "lr": []}
    for step in range(t.steps):
        micro_batches = loader.batch_at(step * t.global_batch_size)
        total = 0.0
        for tokens in micro_batches:
            logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            (loss / len(micro_batches)).backward()  # every micro-batch has the same number of tokens
            total += loss.item() / len(micro_batches)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad).item()
        lr = lr_at_step(step, o, t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["loss"].append(total)
        out["grad_norm"].append(norm)
        out["lr"].append(lr)
    out["weights"] = {k: v.detach().clone() for k, v in params.items()}
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def reference(request, tmp_path_factory, corpus):
    """Per flavour: the initial weights checkpoint and the reference loop's record."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"reference-{arch}")
    init = root / "init"
    cfg = config_mod.load(CONFIG, overrides(corpus, root / "run", arch, init) + ["checkpoint.load=null"])
    write_initial_weights(cfg, init)
    convert("mlite", "hf", init, root / "init-hf", Options())
    record = reference_run(cfg, root / "init-hf", arch)
    norms = record["grad_norm"]
    assert max(norms) > CLIP > min(norms), norms  # clipping both applied and not
    return arch, init, record


def assert_same_run(run_dir: Path, record: dict) -> None:
    """Per step loss and grad norm within rel 1e-5 and the logged lr; final weights within 1e-6, read
    back through the HF converter from megatronlite's last checkpoint."""
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m, loss, norm, lr in zip(metrics, record["loss"], record["grad_norm"], record["lr"]):
        assert math.isclose(m["loss"], loss, rel_tol=1e-5), (m["step"], m["loss"], loss)
        assert math.isclose(m["grad_norm"], norm, rel_tol=1e-5), (m["step"], m["grad_norm"], norm)
        assert math.isclose(m["lr"], lr, rel_tol=1e-12), (m["step"], m["lr"], lr)
    hf_dir = run_dir.parent / f"{run_dir.name}-hf"
    convert("mlite", "hf", run_dir, hf_dir, Options())
    final = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        final.update(load_file(str(f)))
    want = record["weights"]
    assert final.keys() == want.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_one_process_equals_reference(tmp_path, corpus, reference):
    arch, init, record = reference
    run = tmp_path / "run"
    train(run, overrides(corpus, run, arch, init))
    assert_same_run(run, record)


@pytest.mark.slow
def test_tp2_pp2_dp2_distributed_optimizer_equals_reference(tmp_path, corpus, reference):
    """8 gloo processes, TP 2 x PP 2 x DP 2 with sequence parallelism and the distributed optimizer."""
    arch, init, record = reference
    run = tmp_path / "run"
    sets = [
        "parallel.tensor=2",
        "parallel.pipeline=2",
        "parallel.sequence_parallel=true",
        "parallel.distributed_optimizer=true",
    ]
    done = train_job(CONFIG, run, 8, overrides(corpus, run, arch, init) + sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, record)
