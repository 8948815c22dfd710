# Two commands on a fresh machine: `make run` (set up, then the pipeline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export DVC_NO_ANALYTICS ?= 1

.PHONY: setup run test test-all lint lock
setup: $(BIN)/brainmri

$(BIN)/brainmri: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.10  # uv: the lock installed in 26 s, bytecode compiled as pip does, where pip took 87 s (EPYC, 2026-12-08)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock  # exact versions: stages depend on them through versions.yaml
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

lock:  ## re-pin every library (uv), then refresh versions.yaml and dvc.yaml: stages whose libraries moved go stale
	$(PY) -m pip install -q uv
	$(PY) -m uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/brainmri deps --write

run: setup  ## the main job: the pipeline on the dataset in ingest.source, or the offline demo when it is absent
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/brainmri quickstart

# two workers (pytest-xdist), tests/conftest.py giving test_pipeline.py and the files listed there one and every
# other test the other: on 2 cores (EPYC, 2026-12-08) 715 s, against 915 s with the old list (one worker idle 8 min)
XDIST := -n 2 --dist loadscope

test: setup  ## lint, layers, docs, then the unit and scenario tiers (what CI runs): every test but the `long` ones
	$(BIN)/ruff check .
	$(BIN)/lint-imports  # the layers in pyproject.toml: stages never import each other, brainmri never imports flows or tasks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d $$(mktemp -d)  # the docs site: a broken link fails
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST) -m "not long" --durations=20

test-all: setup  ## lint, then every test, the `long` scenarios included
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST)
