# Everything installs into .venv with constraints.txt, so no step ever pulls a CUDA torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS := hf,fastchat,serve,serve-hf,deploy,dev
STAMP  := $(VENV)/.installed
TINY   := .cache/models/toy-model
PYTEST_ARGS ?=

.PHONY: help venv vllm-venv system-deps demo test lint unit integration vllm multihost bench constraints clean

help:
	@echo "make demo   bring up the local default cluster (tiny model), query it through the generated config"
	@echo "make test   lint + every test tier (unit, integration, vllm, multihost; gpu skips without a GPU)"
	@echo "make vllm-venv  the vLLM engine's venv (.cache/vllm-venv, pins in constraints-vllm.txt)"
	@echo "make bench  run the benchmarks in bench/"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# vLLM's CPU build in a venv of its own (configs/cluster/local-vllm.yaml uses it; tests/vllm builds it too).
vllm-venv: $(STAMP)
	$(BIN)/python -m devtools.vllm_env

# Debian packages the multihost tests need (sshd, ip netns); installed only when missing and root.
system-deps:
	@scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) system-deps lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose, an empty run proves nothing"; exit 1; fi; \
	exit $$rc

unit integration vllm multihost: $(STAMP)
	$(BIN)/python -m pytest -m $@ $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m deploy.demo

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-pin after changing dependencies: a fresh venv from pyproject.toml, frozen.
constraints:
	rm -rf .cache/constraints-venv
	$(PYTHON) -m venv .cache/constraints-venv
	.cache/constraints-venv/bin/pip install -q torch==2.13.0
	.cache/constraints-venv/bin/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	{ sed -n '/^#/p' constraints.txt; .cache/constraints-venv/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==.*/torch==2.13.0/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .cache/constraints-venv

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
