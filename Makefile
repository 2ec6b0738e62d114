# Two commands (see README.md):
#   make demo   set up .venv and run the main job on the offline embedded default
#   make test   set up .venv with the test references and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Optional ../shared/data; tests that need it skip without it (CI makes it required).
SHARED_DATA ?= ../shared/data

.PHONY: setup setup-test demo test test-fast lint check-floors clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PIP) install -e '.[test,dev]'
	touch $@

# SkyPilot in a venv of its own, as on the machine you launch from (it needs no jax, and
# its click cap would hold huggingface_hub back in the test venv): tests/test_launch.py
# parses launch/skypilot/*.yaml with it. The version range is the [launch] extra's.
SKY_VENV ?= .venv-sky
$(SKY_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip --disable-pip-version-check -q install -U pip
	$(SKY_VENV)/bin/python -m pip --disable-pip-version-check -q install \
	  "$$($(PYTHON) tests/sky_tasks.py --requirement)" pyyaml
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test $(SKY_VENV)/.ready

# A fresh run each time (a workdir that holds a checkpoint would resume instead).
DEMO_DIR ?= runs/demo
demo: setup
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/tlflax train --config configs/demo.py --workdir $(DEMO_DIR)

# Test files are spread over TEST_WORKERS processes (pytest-xdist; one file stays in one
# process, so module fixtures are built once). TEST_WORKERS=0 runs everything in this one.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup-test
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (real training runs, processes).
test-fast: setup-test
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check tlflax tests benchmarks configs
	$(VENV)/bin/ruff format --check tlflax tests benchmarks configs

# The declared floors, for real: a throwaway venv outside the repo with every runtime
# dependency pinned to its pyproject `>=` floor, then tests/smoke_floors.py (train, resume,
# eval, predict on tests/tiny_config.py). Downloads from PyPI; not part of `make test`.
FLOORS_VENV ?= /tmp/tlflax-floors-venv
FLOORS_PYTHON ?= $(PYTHON)
check-floors:
	rm -rf $(FLOORS_VENV)
	$(FLOORS_PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip --disable-pip-version-check -q install -U pip
	$(FLOORS_PYTHON) tests/smoke_floors.py --constraints > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip --disable-pip-version-check -q install \
	  -c $(FLOORS_VENV)/floors.txt -e .
	$(FLOORS_VENV)/bin/python tests/smoke_floors.py

clean:
	rm -rf $(VENV) $(SKY_VENV) .pytest_cache
