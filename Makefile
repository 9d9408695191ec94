# Quick start: `make run` trains LeNet-5 on the built-in digits; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: run test bench install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp files re-run an install only when pyproject.toml or the constraints change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) --editable .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) --editable '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

# LeNet-5 on the built-in digits, with cnnlab's tuned recipe for them (see RECIPES in cnnlab/config.py).
run: install
	$(BIN)/cnnlab train --model lenet5 --dataset digits --name lenet5-digits --overwrite

test: dev
	$(BIN)/python -m pytest -q

bench: dev
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
