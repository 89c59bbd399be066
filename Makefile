# Two commands do everything on a fresh machine: `make run` and `make test`.
# The environment: .venv in the checkout, or, where the checkout's path has a space, one of its own under
# ~/.cache: Snakemake runs `script:` jobs with its Python's path unquoted (snakemake#2645).
ifeq ($(words $(CURDIR)),1)
VENV   ?= .venv
else
CHECKOUT_ID := $(shell printf '%s' '$(CURDIR)' | sha256sum | cut -c1-12)
VENV   ?= $(HOME)/.cache/attnprog/venv-$(CHECKOUT_ID)
endif
PY     := $(VENV)/bin/python
CORES  ?= 2
# The offline default never touches the Hugging Face Hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# A VENV given under a path with a space would fail the same way: stop before installing.
ifneq ($(words $(abspath $(VENV))),1)
$(error VENV=$(VENV) resolves to a path with a space, where Snakemake cannot run the workflow's scripts (snakemake#2645): give VENV=/a/path/without/spaces)
endif

.PHONY: setup system jail run run-llm costs test test-fast lint clean

setup: $(VENV)/.installed

# torch first and pinned, with pip: that is what takes the local CPU wheel instead of a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# System packages the tests use (the sandbox's jail, a real SLURM, headless Chromium); installed only where missing.
system:
	@bash tools/install_system_packages.sh

# Only the sandbox's jail (bubblewrap): for runs with LLM explainers or other untrusted programs.
jail:
	@bash tools/install_system_packages.sh jail

run: setup
	$(VENV)/bin/snakemake --cores $(CORES) --rerun-incomplete

# The default run with a local code model writing programs beside the offline synthesizer on sampled heads
# (config/llm.yaml; README, "An LLM beside the offline synthesizer"). More overlays: make run-llm LLM="config/llm-0.5b.yaml".
run-llm: setup jail
	$(VENV)/bin/snakemake --cores $(CORES) --rerun-incomplete --configfile config/config.yaml config/llm.yaml $(LLM)

# What the last run cost per model and stage (wall and job seconds, sampled peak memory), from benchmarks/.
costs: setup
	$(PY) -m attnprog.run_costs

test: setup system
	$(PY) -m pytest

# The unit tests: no jail, no network, no Snakemake run (tests/conftest.py); about 50 CPU-seconds.
test-fast: setup
	$(PY) -m pytest -m "not slow and not jail and not network and not workflow"

lint: setup
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results .snakemake benchmarks
