# The two commands a new user needs: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
LOCK_INPUTS := pyproject.toml client/pyproject.toml requirements/torch.in $(wildcard requirements/*.lock)

.PHONY: serve test test-fast install lock system-deps lint bench demo-model clean

serve: $(SERVE_STAMP)
	$(PY) -m app

test: install system-deps
	$(PY) -m pytest

# The fast loop: the unit folder alone (pure units and fakes: no model, no served process, no torch beyond
# the mask decoder's own tests); CONTRIBUTING.md says how long it takes.
test-fast: install
	$(PY) -m pytest tests/unit

install: $(STAMP)

# The locked set (requirements/*.lock, hash-checked): torch's CPU build, or its CUDA build where
# nvidia-smi exists, then everything else, then the project itself (editable). It stops, naming the
# differences, when pyproject.toml has changed since the locks were made: run `make lock` then.
$(STAMP): $(LOCK_INPUTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/lock.py install
	touch $(STAMP)

# What serving needs only (torch, the server, annotated PNGs, quantized weights): no test or lint tools.
# Seconds when the full set is already installed.
$(SERVE_STAMP): $(LOCK_INPUTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/lock.py install --no-dev
	touch $(SERVE_STAMP)

# Regenerate requirements/*.lock from pyproject.toml and requirements/torch.in: after adding, removing or
# bumping a dependency, and after merging branches that did. Needs PyPI; takes seconds.
lock:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/lock.py lock

# Debian packages some tests drive for real (kubectl, promtool, prometheus, podman, chromium); idempotent,
# needs root.
system-deps:
	bash scripts/install-system-deps.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app client/paligemma_client
	$(VENV)/bin/mypy --explicit-package-bases deploy/checks deploy/validate.py

# The benchmark against the peers (benchmarks/RESULTS.md says what it measures; ~40 min on 2 cores).
bench: install
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) -m benchmarks.run

# Train the built-in demo model and its mask decoder from a seed into app/demo/weights (docs/demo.md: what
# it learns, how long it takes here). SEED=1 is the shipped weights' seed (its mask VQ-VAE: docs/demo.md).
SEED ?= 1
demo-model: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m app.demo.train --seed $(SEED) --out app/demo/weights

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
