# tokenfuse — two commands: `make run` (whole stack) and `make test` (whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# Two workers, a file each at a time (one fake + one stack per worker): ~40 % off the
# suite on a 2-core runner. PYTEST_ARGS= (empty) runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=25

.PHONY: setup run test lint bench envoy-config envoy-configs protos prices clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh protos/tokenfuse/admin/v1/admin.proto
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

# The admin API's Python modules and descriptor set from protos/ (setup does it too).
protos: setup
	$(PY) protos/build.py service

envoy-config: setup
	$(PY) -m tokenfuse.deploy.envoy_config -

# Regenerate the committed deployment configs: envoy/*.json (one per deployment shape,
# tokenfuse/deploy/profiles.py) and the Kubernetes ConfigMaps holding them; commit the
# result (tests/test_deploy_artefacts.py fails on drift).
envoy-configs: setup
	$(PY) -m tokenfuse.deploy.envoy_config --all envoy --configmaps deploy/kubernetes

# Regenerate service/tokenfuse/data/prices.json from the newest litellm wheel's bundled
# price dataset (downloaded to a temporary directory, not installed); review and commit.
# PRICES_SOURCE=file.json|https://... uses another copy; PRICES_ARGS adds --version/--date.
PRICES_SOURCE ?=
PRICES_ARGS ?=
prices: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	source="$(PRICES_SOURCE)" && \
	if [ -z "$$source" ]; then \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: litellm -d "$$tmp" && \
	  source=$$(ls "$$tmp"/litellm-*.whl); \
	fi && \
	$(VENV)/bin/tokenfuse prices refresh --source "$$source" $(PRICES_ARGS)

clean:
	rm -rf $(VENV) .tokenfuse .pytest_cache .ruff_cache service/tokenfuse/admin/v1 test-artifacts
