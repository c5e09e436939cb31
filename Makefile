# Two commands set up everything on a fresh machine:
#   make demo   install slim (what it needs to run, nothing more) and run the main job on the
#               embedded default model
#   make test   install the test dependencies and run the whole test suite (what CI runs)
# For your own loop: make test-fast (no real model, no llama.cpp tool builds) and make lint.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP    := $(VENV)/.installed-test

.PHONY: demo test test-fast lint format install bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The first install compiles llama-cpp-python from source (no wheel on PyPI for it): about
# 12 minutes on 2 cores. pip caches the built wheel, so later installs take seconds.
# It is built for portable AVX2 rather than -march=native: on CPUs with AMX, llama.cpp's AMX
# matmul segfaults where the kernel does not grant AMX tile state (as in these sandboxes).
# LLAVA_BUILD=OFF leaves out the multimodal library (mtmd), which slim does not load.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install --quiet --progress-bar off -e .
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet --progress-bar off -e '.[test]'
	touch $(TEST_STAMP)

install: $(RUNTIME_STAMP)

# The main job on the embedded default model: fetch it, export it to a Hugging Face checkpoint,
# convert that to Q4_K_M in one step, and ask the result a question.
DEMO := build/demo
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/slim pull smollm2-135m
	$(BIN)/slim export smollm2-135m -o $(DEMO)/smollm2-hf
	$(BIN)/slim convert $(DEMO)/smollm2-hf -o $(DEMO)/smollm2-q4_k_m.gguf --type Q4_K_M
	$(BIN)/slim run $(DEMO)/smollm2-q4_k_m.gguf "Name the capital of France." --temperature 0 --max-tokens 40

# The whole suite, as CI runs it (.ci/run): the lint gate, then every test.
test: $(TEST_STAMP) lint browser
	$(BIN)/pytest -q

# The chat page's tests drive Debian's chromium through chromedriver: installed here where
# apt-get can (as root, within 10 minutes); elsewhere those tests say they are skipped, and why.
browser:
	@mkdir -p build; command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver' \
	  >build/browser.log 2>&1; } || echo "no chromium here: the chat page's browser tests will be skipped"

# The fast loop: tests that need neither the real model nor a llama.cpp tool build.
test-fast: $(TEST_STAMP)
	$(BIN)/pytest -q -m "not slow"

# ruff (lint and format) and mypy on the package. mypy finds the root as `slim` through a link.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/slim
	$(BIN)/mypy

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Each benchmark runs slim and its llama.cpp peer in the same run and prints the ratios; the
# first run fetches llama-cpp-python's sources and builds llama-bench and llama-server from them.
bench: $(TEST_STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/serve.py --threads 1 --build-llama-server

clean:
	rm -rf $(VENV) build *.egg-info
