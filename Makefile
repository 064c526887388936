# tokenfuse — two commands: `make run` (whole stack) and `make test` (whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint bench envoy-config clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh

run: setup
	$(PY) -m tokenfuse.deploy.stack

test: setup
	$(VENV)/bin/ruff check service tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check service tests bench

bench: setup
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(PY) bench/run.py

envoy-config: setup
	$(PY) -m tokenfuse.deploy.envoy_config -

clean:
	rm -rf $(VENV) .tokenfuse .pytest_cache .ruff_cache
