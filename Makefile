# Two entry points: `make serve` and `make test`. Both create and reuse .venv in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch 2.13.0 is the CPU build that lies on this machine's disk; GPU users install their own.
TORCH_PIN ?= torch==2.13.0

.PHONY: serve test venv clean sysdeps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[executor,test]"
	touch $(STAMP)

venv: $(STAMP)

# `make serve PORT=8080 HOST=0.0.0.0`: the address to bind; unset, FOLDPLAN_HOST and
# FOLDPLAN_PORT or the defaults (127.0.0.1:8000) apply.
serve: $(STAMP)
	$(BIN)/foldplan serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# System packages some tests drive for real (Chromium for the browser test, PostgreSQL for
# the database test, Slurm + munge for the slurm backend test); installed with apt-get when
# missing, skipped with a reason otherwise.
sysdeps:
	bash tests/api/install_system_deps.sh || echo "warning: could not install test system packages; those tests will skip"

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data
