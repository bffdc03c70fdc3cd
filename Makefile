# The two commands a new user needs: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: serve test install system-deps lint bench clean

serve: install
	$(PY) -m app

test: install system-deps
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml requirements/torch-cpu.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@# No NVIDIA GPU: take the CPU build of torch first (see requirements/torch-cpu.txt).
	command -v nvidia-smi >/dev/null 2>&1 || $(PIP) install -q -r requirements/torch-cpu.txt
	@# The server with its test tools, and the Python client + CLI (client/) that the tests also cover.
	$(PIP) install -q -e ".[dev]" -e "./client[supervision]"
	touch $(STAMP)

# Debian packages some tests drive for real (kubectl, promtool, prometheus, chromium); idempotent, needs root.
system-deps:
	bash scripts/install-system-deps.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app client/paligemma_client

# The benchmark against the peers (benchmarks/RESULTS.md says what it measures; ~25 min on 2 cores).
bench: install
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
