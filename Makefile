# Set-up and everyday commands. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on a machine without CUDA pass TORCH_SPEC/TORCH_INDEX for the CPU wheel if your
# default index serves a CUDA build (e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install demo test test-fast lint bench clean

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

test: install
	$(PY) -m pytest -q -rs

# the inner loop: everything but the tests marked slow (multi-process jobs, anything over ~10 s)
test-fast: install
	$(PY) -m pytest -q -rs -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) runs .cache
