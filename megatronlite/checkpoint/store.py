"""Checkpoint directories: DCP shards plus a JSON of metadata, committed atomically.

    checkpoints/step_0000100/   .metadata, __*_*.distcp (DCP), meta.json, config.yaml
    checkpoints/latest          the name of the newest complete checkpoint

A save writes into `checkpoints/.tmp-step_N/`, fsyncs, renames it to `step_N/`, then replaces
`latest` (write + fsync + rename). A process killed at any point leaves the previous checkpoint
and `latest` intact; leftover `.tmp-*` directories are ignored by loading and removed by the
next save. Nothing in our files is pickled: tensors go through DCP, the rest is JSON/YAML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Container, Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatronlite.checkpoint.names import LATEST, META, latest_named, step_name, step_of
from megatronlite.checkpoint.planner import PieceLoadPlanner, PieceSavePlanner
from megatronlite.checkpoint.views import GlobalPiece
from megatronlite.errors import UserError
from megatronlite.untrusted import SafeReader, read_dcp_metadata

# DCP warns that it "assumes the intent is to save in a single process" when torch.distributed
# is not initialized: that is exactly our single-process case
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

FORMAT_VERSION = 1


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_name(step)}"


def prepare(root: Path, step: int) -> Path:
    """(Rank 0, before the collective write.) A fresh temporary directory for step `step`."""
    tmp = temp_dir(root, step)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_shards(
    tmp: Path, tensors: dict[str, torch.Tensor], pieces: Sequence[GlobalPiece] = (), process_group=None
) -> None:
    """(Every rank.) Write this rank's plain tensors and global pieces into the temporary directory through DCP."""
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    dcp.save(tensors, storage_writer=writer, planner=PieceSavePlanner(pieces), process_group=process_group)


def commit(root: Path, step: int, meta: dict, config_yaml: str, keep: int, keep_every: int) -> Path:
    """(Rank 0, after every rank wrote.) Make the checkpoint visible, move `latest`, apply retention."""
    tmp = temp_dir(root, step)
    (tmp / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_tree(tmp)
    final = root / step_name(step)
    replaced = root / f".old-{final.name}"
    if final.exists():  # re-saving a step (a resumed run that reached it again): set aside, deleted once replaced
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)
    _write_atomic(root / LATEST, final.name)
    _apply_retention(root, keep, keep_every, final)
    return final


def step_dirs(root: Path) -> list[Path]:
    """The `step_N` directories in `root`, oldest step first (by number: a name past 7 digits sorts right)."""
    named = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return sorted(named, key=step_of)


def _apply_retention(root: Path, keep: int, keep_every: int, newest: Path) -> None:
    """Keep the `keep` newest steps up to `newest` (and every `keep_every`-th). Steps after `newest` are an
    abandoned history (the run went back to an earlier step): they take no place among the kept, and stay
    until this run saves those steps again, as a user who went back may still want them."""
    history = [p for p in step_dirs(root) if (p / META).is_file() and step_of(p) <= step_of(newest)]
    recent = history[-keep:] if keep > 0 else history
    for p in history:
        if p in recent or p == newest or (keep_every and step_of(p) % keep_every == 0):
            continue
        (p / META).unlink(missing_ok=True)  # the marker first: a kill mid-delete leaves no "complete" husk
        shutil.rmtree(p, ignore_errors=True)


def find_step_dir(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` directory, or one step directory -> the step directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path does not exist: {path}")
    if (path / META).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = latest_complete(root)
    if found is None:
        committed = [p for p in step_dirs(root) if (p / META).is_file()]
        if committed:  # say why the newest is not usable
            read_dcp_metadata(committed[-1])
        raise UserError(f"no complete checkpoint in {path} (expected step_*/meta.json or checkpoints/latest)")
    return found


def latest_complete(root: Path) -> Path | None:
    """The step directory `latest` names, or else the newest complete one; None if there is none. `latest` is
    trusted only to name a step directory beside it: never a path elsewhere."""
    named = latest_named(root)
    if named is not None and is_complete(named):
        return named
    for candidate in reversed(step_dirs(root)):
        if is_complete(candidate):
            return candidate
    return None


def is_complete(step_dir: Path) -> bool:
    """Committed (meta.json, written last) and every shard the DCP metadata names is there at its size."""
    if not (step_dir / META).is_file():
        return False
    try:
        read_dcp_metadata(step_dir)
    except UserError:
        return False
    return True


def read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {step_dir}: {META} is missing or corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {step_dir}: {META} holds {type(meta).__name__}, not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {step_dir}: format version {meta.get('format_version')!r}, this megatronlite reads "
            f"version {FORMAT_VERSION}"
        )
    return meta


def stored_shapes(step_dir: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor stored in a checkpoint."""
    md = read_dcp_metadata(step_dir)
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def check_shapes(
    step_dir: Path, expected: dict[str, tuple[int, ...]], known: Container[str] | None = None, hint: str = ""
) -> None:
    """Raise one error listing every tensor the config expects that the checkpoint lacks or shapes differently, and
    with `known` (every key the config's checkpoints hold) every stored tensor the config has no place for: a load
    must not drop layers, an output layer or Adam's state without a word. `hint` ends the message."""
    stored = stored_shapes(step_dir)
    problems = []
    for key, shape in expected.items():
        if key not in stored:
            problems.append(f"{key} missing")
        elif stored[key] != tuple(shape):
            problems.append(f"{key} is {list(stored[key])}, config needs {list(shape)}")
    if known is not None:
        problems += [f"{key} stored, config has no place for it" for key in sorted(stored) if _foreign(key, known)]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"checkpoint {step_dir} does not match the model config: {shown}{hint}")


def _foreign(key: str, known: Container[str]) -> bool:
    return not key.startswith("rng.") and key not in known


def read_shards(
    step_dir: Path, tensors: dict[str, torch.Tensor], pieces: Sequence[GlobalPiece] = (), process_group=None
) -> None:
    """Load stored tensors in place into the plain `tensors` (whole global tensors) and the global pieces' views.
    A shard that does not hold what the metadata says it does is the checkpoint's fault: one line naming it."""
    reader = SafeReader(str(step_dir))
    try:
        dcp.load(tensors, storage_reader=reader, planner=PieceLoadPlanner(pieces), process_group=process_group)
    except CheckpointException as e:
        raise unreadable(step_dir, "its shards", e) from None


def unreadable(step_dir: Path, what: str, error: CheckpointException) -> UserError:
    """DCP's error of a failed read (one rank's first), as one line naming the checkpoint."""
    cause = next(iter(error.failures.values()))[0]
    return UserError(f"checkpoint {step_dir}: cannot read {what} ({type(cause).__name__}: {cause})")
