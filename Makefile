# entrorl — set-up and everyday commands. Every target creates the virtual environment it needs by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# where torch comes from: pip's configured index by default; e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# for the CPU build where that index would give a CUDA one
TORCH_INDEX ?=
TORCH_PIP_OPTIONS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

# verl gets its own environment: its pins (transformers < 5.11, tensordict <= 0.10, Python < 3.13) conflict
# with the main one. Python 3.11 or 3.12 is needed there.
VERL_PYTHON  ?= python3.11
VERL_VENV    ?= .venv-verl
VERL_BIN     := $(VERL_VENV)/bin
VERL_VERSION ?= 0.9.1

.PHONY: install install-verl test test-verl test-gpu bench lab clean

# The shared step: a virtual environment with the pinned CPU torch, then entrorl with its dev extras.
# torch is installed first and alone, so no later requirement can pull a different (CUDA) build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_OPTIONS) torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# verl with its real dependencies (Ray, hydra, tensordict, wandb, ...: two to three minutes from a warm pip
# cache). torch is installed first and alone, then a constraints file holds it at that version, so
# nothing verl or entrorl requires can replace it.
$(VERL_BIN)/.installed: pyproject.toml
	$(VERL_PYTHON) -m venv $(VERL_VENV)
	$(VERL_BIN)/pip install --quiet --upgrade pip
	$(VERL_BIN)/pip install --quiet $(TORCH_PIP_OPTIONS) torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VERL_VENV)/constraints.txt
	$(VERL_BIN)/pip install --quiet -c $(VERL_VENV)/constraints.txt -e ".[dev,verl]" verl==$(VERL_VERSION)
	touch $@

install-verl: $(VERL_BIN)/.installed

# The whole suite in the main environment, then the verl tests in the verl environment.
test: install install-verl
	bash scripts/run_tests.sh

test-verl: install-verl
	VERL_ONLY=1 bash scripts/run_tests.sh

# The checks that need a CUDA GPU and vLLM (own environment .venv-gpu); not part of `make test`.
test-gpu:
	bash scripts/gpu_checks.sh

bench: install
	$(BIN)/python benchmarks/bench_token_stats.py

lab: install
	$(BIN)/entrorl lab --preset default

clean:
	rm -rf $(VENV) $(VERL_VENV) .venv-gpu build dist src/*.egg-info .pytest_cache
