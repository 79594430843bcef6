# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel keeps set-up small; a torch already in the venv (e.g. a CUDA build) is kept.
TORCH_PIN ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
# Many tests wait on subprocesses and servers, so three workers keep two cores busy.
PYTEST_WORKERS ?= 3

.PHONY: run runtime test lint typecheck pytest setup system-packages postgres bench clean

# `make run` installs what serving needs (.runtime); `make test` adds the dev extras (.installed).
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

runtime: $(VENV)/.runtime

run: runtime
	$(VENV)/bin/tuner serve --host $(HOST) --port $(PORT)

# Debian packages some tests use: Chromium for the browser tests, docker-compose to validate
# docker-compose.yml. Installed when we may (root) and missing; otherwise those tests skip.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/docker-compose
system-packages:
	@missing=0; for f in $(SYSTEM_TOOLS); do [ -x $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver docker-compose >/dev/null) \
	      || echo "system packages could not be installed: browser and compose tests will be skipped"; \
	  else echo "chromium/docker-compose missing and not root: their tests will be skipped"; fi; \
	fi

# Tests that need PostgreSQL use the local server; start it when it is installed but stopped.
postgres:
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || \
	  (command -v pg_ctlcluster >/dev/null && pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start) || \
	  echo "PostgreSQL not reachable: PostgreSQL tests will be skipped"

# The layers of docs/design.md as import-linter contracts (pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup system-packages postgres
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test: lint typecheck pytest

bench: setup
	$(PY) bench/estimate_accuracy.py
	$(PY) bench/api_latency.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
