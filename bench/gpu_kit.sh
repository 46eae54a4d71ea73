#!/usr/bin/env bash
# The GPU check's set-up, in one place for `make gpu-wheels` / `make gpu-check` and for a GPU machine without make.
#
#   bash bench/gpu_kit.sh wheels [PYTHON]          here (package registry at hand): .whl/ <- what the image lacks
#   bash bench/gpu_kit.sh install [PYTHON] [VENV]  there (no network): VENV over the image's python, from .whl/
#   VENV/bin/python bench/gpu_check.py --results DIR
#
# The image (shared/FACTS.md): Python 3.12 with torch + CUDA, triton and transformers, itself a venv; no internet.
# The wheels: megatron-core and the test tools with their dependencies, nothing the image has (numpy, pyyaml, ...).
# setuptools: pyproject's build backend needs >= 77 and torch 2.11 requires < 82; one outside that range makes pip
# replace the image's torch (or, with no other torch at hand, refuse the install).
set -euo pipefail
cd "$(dirname "$0")/.."

SETUPTOOLS="setuptools>=77,<82"
WHEELS=(megatron-core==0.16.1 packaging "$SETUPTOOLS" pytest pytest-timeout iniconfig pluggy pygments hypothesis
    sortedcontainers)
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12} # the image's python, which the wheels are for

wheels() {
    local python=${1:-python3}
    rm -rf .whl
    "$python" -m pip download -q --dest .whl --no-deps --only-binary=:all: \
        --python-version "$PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${WHEELS[@]}"
    du -sh .whl
}

# a venv over the image's python, so its CUDA torch is the one used; setuptools first (pyproject's build backend)
install() {
    local python=${1:-python3} venv=${2:-.venv-gpu}
    [[ -d .whl ]] || { echo "gpu_kit: no .whl/ here: run 'make gpu-wheels' where pip reaches a registry" >&2; exit 2; }
    # the image's torch is the one kept (.whl/ holds none): a python without it cannot install offline
    "$python" -c 'import torch' 2>/dev/null || {
        echo "gpu_kit: $python does not import torch; name the image's python (make gpu-check GPU_PYTHON=...)" >&2
        exit 2
    }
    "$python" -m venv --system-site-packages --without-pip "$venv"
    # the image's packages also where its python is itself a venv (--system-site-packages sees only the base's);
    # site.addsitedir, so their own .pth files (editable installs) count too
    local purelib
    purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    "$python" -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages()))" \
        >"$purelib/image.pth"
    "$venv/bin/python" -m pip install -q --no-index --find-links .whl "$SETUPTOOLS"
    "$venv/bin/python" -m pip install -q --no-index --find-links .whl --no-build-isolation -e ".[gpu]"
}

case ${1:-} in
wheels | install) "$@" ;;
*)
    echo "usage: bash bench/gpu_kit.sh wheels [PYTHON] | install [PYTHON] [VENV]" >&2
    exit 2
    ;;
esac
