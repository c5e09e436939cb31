# Two commands set up everything on a fresh machine:
#   make demo   install slim and run the main job on the embedded default model
#   make test   install the test dependencies and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The first install compiles llama-cpp-python from source (no wheel on PyPI for it): about
# 17 minutes on 2 cores. pip caches the built wheel, so later installs take seconds.
# It is built for portable AVX2 rather than -march=native: on CPUs with AMX, llama.cpp's AMX
# matmul segfaults where the kernel does not grant AMX tile state (as in these sandboxes).
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
$(STAMP): pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install --quiet --progress-bar off -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model: fetch it, export it to a Hugging Face checkpoint,
# convert that to Q4_K_M in one step, and ask the result a question.
DEMO := build/demo
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/slim pull smollm2-135m
	$(BIN)/slim export smollm2-135m -o $(DEMO)/smollm2-hf
	$(BIN)/slim convert $(DEMO)/smollm2-hf -o $(DEMO)/smollm2-q4_k_m.gguf --type Q4_K_M
	$(BIN)/slim run $(DEMO)/smollm2-q4_k_m.gguf "Name the capital of France." --temperature 0 --max-tokens 40

test: install
	$(BIN)/python -m pytest -q

# Each benchmark runs slim and its llama.cpp peer in the same run and prints the ratios; the
# first run fetches llama-cpp-python's sources and builds llama-bench and llama-server from them.
bench: install
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/serve.py --threads 1 --build-llama-server

clean:
	rm -rf $(VENV) build *.egg-info
