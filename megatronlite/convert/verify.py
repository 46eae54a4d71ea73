"""`convert --verify`: run the source and the converted model on the same fixed tokens, in one process
on the CPU in fp32, and report the largest logit difference and whether greedy decoding agrees. It passes
when greedy decoding agrees and the logits differ by no more than arithmetic (or, where the conversion
narrowed the weights to 16 bits, their rounding) explains: a relative difference of `tolerance`.

An HF directory runs in transformers, so a conversion to or from `hf` is checked against an
independent implementation; the other formats run in megatronlite's model after being read back
by their reader, which checks that what was written reads back as what was read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatronlite.config import ModelConfig
from megatronlite.convert import hf
from megatronlite.convert.formats import read
from megatronlite.convert.model_state import Options, build_model
from megatronlite.extras import require

Run = Callable[[torch.Tensor], torch.Tensor]  # token ids [batch, seq] -> logits [batch, seq, vocab]
SEQUENCES, LENGTH, PROMPT, NEW_TOKENS = 4, 32, 8, 16
SAME_WEIGHTS, NARROWED = 1e-4, 5e-2  # relative logit tolerances: weights as stored, or rounded to 16 bits


@dataclass(frozen=True)
class Report:
    source: str
    converted: str
    max_logit_diff: float
    relative_diff: float  # max_logit_diff over the source's largest |logit|
    tolerance: float
    greedy_agrees: int  # prompts whose greedy continuations are identical
    prompts: int
    new_tokens: int

    @property
    def passed(self) -> bool:
        return self.greedy_agrees == self.prompts and self.relative_diff <= self.tolerance

    def lines(self) -> list[str]:
        verdict = "agrees" if self.greedy_agrees == self.prompts else "DIFFERS"
        within = "within" if self.relative_diff <= self.tolerance else "OVER"
        return [
            f"verify: source {self.source}; converted {self.converted}",
            f"verify: largest |logit difference| {self.max_logit_diff:.3g} on {SEQUENCES} fixed sequences "
            f"(relative {self.relative_diff:.2g}, {within} the tolerance {self.tolerance:g})",
            f"verify: greedy decoding of {self.new_tokens} tokens {verdict} "
            f"({self.greedy_agrees}/{self.prompts} prompts identical)",
        ]


def transformers_for(formats: tuple[str, str]):
    """transformers, when one side of the check is an HF model (else None); a UserError if it is missing."""
    return require("transformers", "hf", "convert --verify with an hf model") if "hf" in formats else None


def _runner(fmt: str, path: Path, options: Options) -> tuple[Run, str]:
    if fmt == "hf":
        _, family = hf.read_config(path)
        transformers = transformers_for((fmt, fmt))
        transformers.utils.logging.disable_progress_bar()
        model = getattr(transformers, family.ARCHITECTURE).from_pretrained(str(path)).float().eval()
        return (lambda ids: model(ids).logits), f"transformers {family.ARCHITECTURE}"
    return build_model(read(fmt, path, options)), f"megatronlite model of the {fmt} checkpoint"


def _greedy(run: Run, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt[None]
    for _ in range(steps):
        ids = torch.cat([ids, run(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel() :].tolist()


@torch.no_grad()
def verify(
    src: tuple[str, Path], dst: tuple[str, Path], model: ModelConfig, options: Options, narrowed: bool
) -> Report:
    """`narrowed`: the conversion rounded the weights to fewer bits than the source holds."""
    run_a, name_a = _runner(*src, options)
    run_b, name_b = _runner(*dst, options)
    length = min(LENGTH, model.max_seq_len)
    tokens = torch.randint(0, model.vocab_size, (SEQUENCES, length), generator=torch.Generator().manual_seed(0))
    reference = run_a(tokens).float()
    diff = (reference - run_b(tokens).float()).abs().max().item()
    relative = diff / max(reference.abs().max().item(), torch.finfo(torch.float32).tiny)
    prompt = min(PROMPT, length - 1)
    steps = min(NEW_TOKENS, model.max_seq_len - prompt)
    prompts = tokens[:2, :prompt]
    agree = sum(_greedy(run_a, p, steps) == _greedy(run_b, p, steps) for p in prompts)
    tolerance = NARROWED if narrowed else SAME_WEIGHTS
    return Report(name_a, name_b, diff, relative, tolerance, agree, len(prompts), steps)
