# entrorl — set-up and everyday commands. Every target creates .venv by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test bench lab clean

# The shared step: a virtual environment with the pinned CPU torch, then entrorl with its dev extras.
# torch is installed first and alone, so no later requirement can pull a different (CUDA) build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

test: install
	bash scripts/run_tests.sh

bench: install
	$(BIN)/python benchmarks/bench_token_stats.py

lab: install
	$(BIN)/entrorl lab --preset default

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
