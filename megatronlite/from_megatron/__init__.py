"""`megatronlite config from-megatron`: a Megatron-LM training script or checkpoint as a megatronlite config.

`shell` finds the pretrain_gpt.py command line a bash script runs; a checkpoint's args are read as `convert
--from megatron` reads them; `flags` knows Megatron-LM's flags and defaults; `mapping` turns the values into
config keys and reports every flag it cannot map. Here they are put together, and the config is validated
with the loader a run uses, so what is written is a config `megatronlite train` accepts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatronlite.errors import UserError
from megatronlite.from_megatron import flags
from megatronlite.from_megatron.mapping import Args, Mapper, Report, given_in_checkpoint


@dataclass
class Conversion:
    raw: dict  # the config as its YAML holds it
    report: Report
    source: str  # what it came from, for the header
    world_size: int | None  # the GPUs Megatron ran on, where the launcher or checkpoint says


def from_script(path: Path, positional: list[str] | None = None) -> Conversion:
    """The config of the pretrain_gpt.py command a bash script runs; `positional` are its `$1 $2 ...`."""
    from megatronlite.from_megatron.shell import read_script

    invocation = read_script(path, positional or [])
    if invocation.program != "pretrain_gpt.py":
        raise UserError(
            f"{path} line {invocation.line}: runs {invocation.program}; megatronlite trains GPT models "
            "(pretrain_gpt.py)"
        )
    line = flags.parse(invocation.argv, str(path))
    mapper = Mapper(Args(line.values), line.written, str(path), invocation.world_size)
    raw = mapper.config(_name(path.stem))
    mapper.report.notes[:0] = invocation.notes
    source = f"{path}, line {invocation.line}: {invocation.program}"
    return _checked(Conversion(raw, mapper.finish(line.unknown), source, invocation.world_size))


def from_checkpoint(path: Path) -> Conversion:
    """The config of the run a Megatron-LM checkpoint came from, read from the args it stores."""
    from megatronlite.convert import megatron, megatron_dist, megatron_legacy

    if path.is_file():  # model_optim_rng.pt or common.pt: its checkpoint directory
        path = path.parent.parent if path.parent.name.startswith("mp_rank_") else path.parent
    directory = megatron.iteration_dir(path)
    fmt = megatron_dist if megatron_dist.is_dist(directory) else megatron_legacy
    values = fmt.load_args(directory)
    world = values.get("world_size") if isinstance(values.get("world_size"), int) else None
    mapper = Mapper(Args(values), given_in_checkpoint(values), str(directory), world)
    run = directory.parent if re.fullmatch(rf"iter_\d+|{megatron.RELEASE}", directory.name) else directory
    raw = mapper.config(_name(run.name))
    mapper.note(
        f"to start from its weights: megatronlite convert --from megatron --to mlite {path} DST, then "
        "checkpoint.load: DST"
    )
    return _checked(Conversion(raw, mapper.finish([]), str(directory), world))


def run_settings(values: dict, where: str, max_seq_len: int) -> tuple[dict, Report]:
    """The `train` and `optim` sections a Megatron run's stored args map to (length, batches, seed, precision,
    the LR schedule, Adam): what `convert --from megatron` gives a carried run, so its LR continues Megatron's."""
    mapper = Mapper(Args(values), given_in_checkpoint(values), where, None)
    train = mapper.train(max_seq_len)
    optim = mapper.optim(train["steps"], train["global_batch_size"])
    return {"train": train, "optim": optim}, mapper.finish([])


def convert_source(path: Path, positional: list[str] | None = None) -> Conversion:
    """A script file, or a checkpoint (a directory, or one of its .pt files)."""
    if path.is_dir() or (path.is_file() and path.suffix == ".pt"):
        if positional:
            raise UserError(f"{path}: a checkpoint takes no script arguments (got {' '.join(positional)})")
        return from_checkpoint(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (give a Megatron-LM training script or checkpoint)")
    return from_script(path, positional)


def _name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-") or "megatron"


def _checked(conversion: Conversion) -> Conversion:
    """Validate the config as `megatronlite train` would; the layout too, on the world size Megatron ran on."""
    from megatronlite import config

    try:
        cfg = config.from_dict(copy.deepcopy(conversion.raw))
    except UserError as e:
        raise UserError(f"{conversion.source.split(',')[0]}: the converted config is not valid: {e}") from None
    world = conversion.world_size
    if world:
        try:
            config.validate_layout(cfg, world)
        except UserError as e:
            conversion.report.notes.append(f"on {world} workers (Megatron's world size) megatronlite refuses: {e}")
    return conversion


def render(conversion: Conversion) -> str:
    """The config as YAML, the report at its top as comments."""
    r = conversion.report
    header = [
        "Written by `megatronlite config from-megatron` from",
        f"  {conversion.source}",
        f"{len(r.mapped)} flags mapped"
        + (f"; Megatron ran on {conversion.world_size} GPUs" if conversion.world_size else ""),
        *r.lines(),
    ]
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header)
    return comments + yaml.safe_dump(conversion.raw, sort_keys=False)
