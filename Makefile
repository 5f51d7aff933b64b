# Two commands on a fresh clone: `make pipeline` and `make test` (CI: `make lint`, then `make test`).
# `make test-fast`: the unit tests only (no whole stages, no dvc), for the edit-test loop.
#
# torch is installed first and pinned here, because an unpinned torch from the
# registry is a multi-GB CUDA build. On a GPU machine pick your build, e.g.
#   make test TORCH_SPEC="torch==2.11.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: pipeline test test-fast lint install install-dev clean

pipeline: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed-dev
	python -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	python -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	ruff check .

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) mlflow.db mlruns
