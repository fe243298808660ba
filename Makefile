# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing,
# installs the CPU torch wheel first (a bare torch requirement would pull a CUDA build), then dallm
# with the exact versions of constraints.txt (the lock), so an upstream release cannot break a clone.
# The `ray` extra is installed too (a ~80 MB wheel, no torch): the Ray executor's tests run in CI.
# `make demo` starts (or reuses) a daemon, submits the quickstart and shows it live in the TUI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SCRATCH ?= /tmp/dallm-scratch-venv

.PHONY: setup demo test lint bench clean lock check-latest

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ray]'
	$(BIN)/pip check
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dallm run configs/quickstart.toml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Refresh the lock on purpose: the newest versions pyproject.toml allows, resolved in a scratch venv
# and frozen into constraints.txt. Then `make test`, and commit constraints.txt if it passes.
# `make lock KEEP=1` resolves the same requirements within the current lock instead: every pinned
# version stays, and only what pyproject's requirements add or no longer need changes (a dependency
# added to pyproject, or pins written into constraints.txt by hand, frozen as pip resolves them).
lock:
	rm -rf $(SCRATCH) && $(PY) -m venv $(SCRATCH)
	$(SCRATCH)/bin/pip install -q --upgrade pip
	$(SCRATCH)/bin/pip install -q $(TORCH)
	$(SCRATCH)/bin/pip install -q $(if $(KEEP),-c constraints.txt) '.[dev,ray]' && rm -rf build
	$(SCRATCH)/bin/pip check
	{ echo "# The tested dependency set (make lock; see README 'Installing'). Python 3.11, CPU torch."; \
	  $(SCRATCH)/bin/pip freeze --exclude-editable | grep -v -i '^dallm[=@ ]' | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf $(SCRATCH)

# Not part of CI: what a user gets from `pip install dallm` today (pyproject's ranges, no lock),
# with the fast tests, so the next upstream break is found here first.
check-latest:
	rm -rf $(SCRATCH) && $(PY) -m venv $(SCRATCH)
	$(SCRATCH)/bin/pip install -q --upgrade pip
	$(SCRATCH)/bin/pip install -q $(TORCH)
	$(SCRATCH)/bin/pip install -q --upgrade -e '.[dev,ray]'
	$(SCRATCH)/bin/pip check
	$(SCRATCH)/bin/pip list --format=freeze | grep -iE '^(torch|diffusers|transformers|peft|textual|accelerate)='
	$(SCRATCH)/bin/python -m pytest -n 2 --dist loadgroup -m 'not slow' -x

clean:
	rm -rf $(VENV) runs .pytest_cache
