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
# Both steps are bench/gpu_kit.sh, which also runs where there is no make (its header says how).
GPU_PYTHON ?= python3
GPU_VENV ?= .venv-gpu
GPU_DRY_RUN ?=
GPU_RESULTS ?= $(if $(GPU_DRY_RUN),runs/gpu_check,bench/results)

gpu-wheels: $(VENV)/.torch
	bash bench/gpu_kit.sh wheels $(PY)

$(GPU_VENV)/.installed: pyproject.toml bench/gpu_kit.sh
	bash bench/gpu_kit.sh install $(GPU_PYTHON) $(GPU_VENV)
	touch $@

# GPU_DRY_RUN=1: the same steps on a machine without CUDA, tiny sizes, in the dev venv (CI: tests/test_gpu_check.py)
ifdef GPU_DRY_RUN
gpu-check: install
	$(PY) bench/gpu_check.py --dry-run --results "$(GPU_RESULTS)"
else
gpu-check: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python bench/gpu_check.py --results "$(GPU_RESULTS)"
endif
