# The README's two commands. Each sets itself up: a venv in .venv with this package installed.
# torch==2.13.0 is tried first (a CPU wheel on some machines' local disk); any torch otherwise.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test clean

# the package alone for the demo; the test dependencies (moto's S3 server, tensorboard, ...) on top for the tests
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pikv_offline.tools.demo --workdir runs/demo

test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf runs .pytest_cache
