# Self-sufficient targets: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: install install-test run test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,flower]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(PY) -m gradax.experiments.run --config=experiments/configs/default.py

test: install-test
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q --durations=25 tests

bench: install-test
	$(PY) -m gradax.experiments.bench all

clean:
	rm -rf $(VENV) results
