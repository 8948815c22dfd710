# Two commands on a fresh machine: `make run` (set up, then the pipeline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup run test lint
setup: $(BIN)/brainmri

$(BIN)/brainmri: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup  ## the main job: the pipeline on the dataset in ingest.source, or the offline demo when it is absent
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/brainmri quickstart

test: setup  ## lint, then every test tier (unit + slow scenarios)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest
