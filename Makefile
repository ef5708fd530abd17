# cellmtl — the two commands: `make figures` and `make test`.
# Both first make sure .venv exists and matches pyproject.toml: pip runs only when the file changed
# (its sha256 is kept in .venv/.pyproject.sha256).
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pyproject.sha256
PROFILE ?= smoke
# scGPT's own model code (release 0.2.4, from PyPI, without its dependencies: its torchtext pin does not install
# beside current torch). Only tests/test_scgpt_model.py reads it, to check that scGPT state dicts load into ours.
SCGPT_REFERENCE := $(VENV)/reference/scgpt-0.2.4
export CELLMTL_SCGPT_REFERENCE := $(abspath $(SCGPT_REFERENCE))

# Offline copies of the real datasets (see ../shared/data/SOURCES.md). Without them the loaders
# download from the pinned URLs instead.
ifneq ($(wildcard ../shared/data/SHA256SUMS),)
export CELLMTL_DATA_DIR ?= $(abspath ../shared/data)
endif
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0

.PHONY: help venv reference figures test test-all sync-check nbtest pytest export clean-build
.DEFAULT_GOAL := help

help:
	@echo "make figures   set up .venv if needed, then regenerate every paper figure (profile: $(PROFILE))"
	@echo "make test      set up .venv if needed, then the notebook lessons (nbdev-test) and pytest"
	@echo "make export    notebooks -> cellmtl/ package, clean notebooks, README.md from nbs/index.ipynb"
	@echo "make test-all  make test plus the lessons flagged #| slow (a few minutes more)"

venv:
	@want=$$($(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest())"); \
	have=$$(cat $(STAMP) 2>/dev/null); \
	if [ "$$want" != "$$have" ]; then \
	  echo "== pyproject.toml changed (or no .venv yet): pip install -e '.[dev]' into $(VENV)"; \
	  if [ ! -x $(BIN)/python ]; then $(PYTHON) -m venv $(VENV) || exit 1; fi; \
	  $(BIN)/python -m pip install --quiet --upgrade pip && \
	  $(BIN)/python -m pip install -e ".[dev]" && echo "$$want" > $(STAMP) || exit 1; \
	else echo "== $(VENV) is up to date with pyproject.toml"; fi

reference: venv
	@if [ ! -f $(SCGPT_REFERENCE)/scgpt/model/model.py ]; then \
	  echo "== installing scGPT 0.2.4's source (no dependencies) into $(SCGPT_REFERENCE) for the checkpoint-compatibility test"; \
	  $(BIN)/python -m pip install --quiet --no-deps --target $(SCGPT_REFERENCE) "scgpt==0.2.4" || exit 1; \
	fi

figures: venv
	$(BIN)/cellmtl figures --profile $(PROFILE)

# nbdev-test runs notebooks in parallel (one per core): one BLAS/torch thread each, no oversubscription.
test test-all: export OMP_NUM_THREADS ?= 1
# scanpy's numba kernels would otherwise reset torch's thread count to the core count after the first HVG selection.
test test-all: export NUMBA_NUM_THREADS ?= 1
test: venv reference sync-check nbtest pytest
	@echo "== make test: all passed"

# CI fails when nbdev-export, nbdev-clean or the README render would change a tracked file.
sync-check:
	@before=$$(git status --porcelain --untracked-files=no; git diff | sha256sum); \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/cellmtl readme --quiet || exit 1; \
	after=$$(git status --porcelain --untracked-files=no; git diff | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "ERROR: nbdev-export / nbdev-clean / README render changed tracked files:"; \
	  git status --porcelain --untracked-files=no; \
	  echo "The notebooks are the source: run 'make export' and commit the result."; exit 1; \
	else echo "== notebooks, package and README are in sync"; fi

nbtest:
	$(BIN)/nbdev-test --timing

test-all: venv reference sync-check pytest
	$(BIN)/nbdev-test --timing --flags slow

pytest:
	$(BIN)/python -m pytest -q

export: venv
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/cellmtl readme

clean-build:
	rm -rf build/figures
