# Set-up and the two entry points a new machine needs. `make demo` trains the tiny model on the
# embedded demo corpus end to end; `make test` runs the test suite. Both create .venv first.
# `make test-slurm` (root) starts the 2-node SLURM of launch/testcluster, runs the `slurm` tests
# on it and stops it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-slurm lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	# constraints.txt: the exact versions CI tests, the same the Docker image installs.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,eval]"
	$(PY) launch/check_versions.py
	touch $@

demo: setup
	$(PY) -m orchestration.demo

# Browser tests (the gallery in headless chromium) need apt's chromium + chromium-driver: CI
# runs them after the slow tests (.ci/run); `make test-all` runs them when chromium is there.
test: setup
	$(PY) -m pytest -q -m "not slow and not slurm and not browser" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slurm: setup
	launch/testcluster/start.sh
	status=0; SLURM_CONF=$${SLURM_TESTCLUSTER_DIR:-/tmp/open-pretrain-slurm}/slurm.conf \
	  $(PY) -m pytest -q -m slurm $(PYTEST_ARGS) || status=$$?; \
	  launch/testcluster/stop.sh; exit $$status

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs outputs multirun data/demo
