# mino-jupyter: the two commands are `make demo` and `make test`. Each sets up what it needs
# (system packages, Podman configuration, the API service, the venv, the base image) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PYTEST_ROOTLESS_ARGS ?=
# Cells again with the resident executor off (MINO_EXECUTOR=0): one exec per cell, the path the
# engine can always take.
FALLBACK_TESTS ?= tests/integration/test_magic.py tests/integration/test_containment.py tests/integration/test_executor.py

.PHONY: setup demo test test-rootless unit mutants notebooks bench lab clean-containers

setup:
	@scripts/setup-host.sh

demo:
	@scripts/setup-host.sh --toolchains
	@$(PY) scripts/demo.py

test:
	@scripts/setup-host.sh --browser --toolchains --ssh
	MINO_REQUIRE_PODMAN=1 $(PY) -m pytest $(PYTEST_ARGS)
	MINO_REQUIRE_PODMAN=1 MINO_EXECUTOR=0 $(PY) -m pytest $(PYTEST_ARGS) $(FALLBACK_TESTS)
	$(PY) scripts/notebooks.py --check
	$(PY) scripts/notebooks.py --check-in-place
	$(PY) tests/mutants/run.py
	PYTEST_ROOTLESS_ARGS="$(PYTEST_ROOTLESS_ARGS)" scripts/rootless-test.sh

# The integration suite again as a normal user (mino-ci) with rootless Podman; run as root.
test-rootless:
	PYTEST_ROOTLESS_ARGS="$(PYTEST_ROOTLESS_ARGS)" scripts/rootless-test.sh

mutants: setup
	$(PY) tests/mutants/run.py

notebooks:
	@scripts/setup-host.sh --toolchains
	$(PY) scripts/notebooks.py

unit:
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: setup
	bash bench/setup-llm-sandbox.sh
	$(PY) bench/run.py

clean-containers:
	$(VENV)/bin/mino-jupyter prune --all

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser --allow-root notebooks
