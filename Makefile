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

# digits has 1,295 training images: batches of 32 give enough steps, and small random
# shifts keep LeNet-5 from memorizing them (98.6-99.2% test over seeds 0-2; defaults: ~96.5%).
run: install
	$(BIN)/cnnlab train --model lenet5 --dataset digits --epochs 15 --batch-size 32 --lr 0.05 --translate 0.1 \
		--name lenet5-digits --overwrite

test: dev
	$(BIN)/python -m pytest -q

bench: dev
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
