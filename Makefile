# Set-up and everyday commands. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on a machine without CUDA pass TORCH_SPEC/TORCH_INDEX for the CPU wheel if your
# default index serves a CUDA build (e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install demo test test-fast lint bench clean gpu-wheels gpu-check

# torch on its own first (TORCH_INDEX may name another index), then megatronlite: `demo` needs only the
# package and its core dependencies; `test`, `lint` and `bench` need the dev extras (linters, triton, hf, ...).
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.package: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.dev

demo: $(VENV)/.package
	$(VENV)/bin/megatronlite train configs/demo.yaml --run-dir runs/demo
	$(VENV)/bin/megatronlite generate runs/demo --prompt "def read_file(path):" --max-new-tokens 300 --temperature 0.7 --top-k 20

# DeepSpeed's JIT ops built first, outside any test's timeout (tests/build_deepspeed_ops.py says why); then
# TEST_WORKERS test files at a time (pytest-xdist; each file in one worker, so its module fixtures run once)
TEST_WORKERS ?= 2
test: install
	$(PY) tests/build_deepspeed_ops.py
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

# the inner loop: everything but the tests marked slow (multi-process jobs, anything over ~10 s)
test-fast: install
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) runs .cache

# A lent GPU machine (shared/FACTS.md: Python 3.12, torch + CUDA, triton and transformers; no internet) gets what
# its image lacks as wheels: `make gpu-wheels` here fills .whl/ (git-ignored: copy it there with the tree, e.g.
# the device tool's `carry: [".whl"]`), then `make gpu-check` there installs from it and writes
# $(GPU_RESULTS)/gpu_check_<GPU>_<date>.md (bench/gpu_check.py; GPU_RESULTS=$$OUT where only $$OUT comes back).
# Without make there: the three commands of $(GPU_VENV)/.installed, then `$(GPU_VENV)/bin/python bench/gpu_check.py`.
# GPU_WHEELS: megatron-core and the test tools with their dependencies, nothing the image has (numpy, pyyaml, ...).
# setuptools: pyproject's build backend needs >= 77 and torch 2.11 requires < 82; one outside that range makes pip
# replace the image's torch (or, with no other torch at hand, refuse the install)
GPU_SETUPTOOLS := "setuptools>=77,<82"
GPU_WHEELS := megatron-core==0.16.1 packaging $(GPU_SETUPTOOLS) pytest pytest-timeout iniconfig pluggy pygments \
	hypothesis sortedcontainers
GPU_PYTHON ?= python3
# the image's python (FACTS.md), which the wheels are for
GPU_PYTHON_VERSION ?= 3.12
GPU_VENV ?= .venv-gpu
GPU_DRY_RUN ?=
GPU_RESULTS ?= $(if $(GPU_DRY_RUN),runs/gpu_check,bench/results)

gpu-wheels: $(VENV)/.torch
	rm -rf .whl
	$(PY) -m pip download -q --dest .whl --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		$(GPU_WHEELS)
	du -sh .whl

# a venv over the image's python, so its CUDA torch is the one used; setuptools first (pyproject's build backend)
$(GPU_VENV)/.installed: pyproject.toml
	$(GPU_PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV)
	# the image's packages also where its python is itself a venv (--system-site-packages sees only the base's);
	# site.addsitedir, so their own .pth files (editable installs) count too
	$(GPU_PYTHON) -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages()))" \
		> "$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/image.pth"
	$(GPU_VENV)/bin/python -m pip install -q --no-index --find-links .whl $(GPU_SETUPTOOLS)
	$(GPU_VENV)/bin/python -m pip install -q --no-index --find-links .whl --no-build-isolation -e ".[gpu]"
	touch $@

# GPU_DRY_RUN=1: the same steps on a machine without CUDA, tiny sizes, in the dev venv (CI: tests/test_gpu_check.py)
ifdef GPU_DRY_RUN
gpu-check: install
	$(PY) bench/gpu_check.py --dry-run --results "$(GPU_RESULTS)"
else
gpu-check: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python bench/gpu_check.py --results "$(GPU_RESULTS)"
endif
