# Two commands (see README.md):
#   make demo   set up .venv and run the main job on the offline embedded default
#   make test   set up .venv with the test references and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Optional ../shared/data; tests that need it skip without it (CI makes it required).
SHARED_DATA ?= ../shared/data

.PHONY: setup setup-test demo test lint clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PIP) install -e '.[test,dev]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# A fresh run each time (a workdir that holds a checkpoint would resume instead).
DEMO_DIR ?= runs/demo
demo: setup
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/tlflax train --config configs/demo.py --workdir $(DEMO_DIR)

test: setup-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check tlflax tests benchmarks configs
	$(VENV)/bin/ruff format --check tlflax tests benchmarks configs

clean:
	rm -rf $(VENV) .pytest_cache
