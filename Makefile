# Two commands: `make demo` and `make test`. Both install what is missing first, and both are
# idempotent: a second run reinstalls nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export MAINTCTL_TEST_PG_URL ?= postgresql+psycopg://maintctl:maintctl@127.0.0.1:5432/maintctl

.PHONY: demo demo-stop test lint typecheck host testbed venv bench bench-fleet clean

host:
	@deploy/install-debian.sh

testbed:
	@tests/bed-up.sh

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --upgrade pip
	@$(VENV)/bin/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: testbed venv
	@$(VENV)/bin/python -m deploy.demo

demo-stop: venv
	@$(VENV)/bin/python -m deploy.demo stop

bench: testbed venv
	@$(VENV)/bin/python -m bench.pause --guests 8 --cycles 3

# No QEMU and no libvirtd: libvirt's test driver in-process, SQLite in a temporary directory.
bench-fleet: venv
	@$(VENV)/bin/python -m bench.fleet --hosts 100 --guests-per-host 10 --domains 10 --runs 3 --phases

# The layers and what each may import: .importlinter (docs/architecture.md).
lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/lint-imports --no-cache

typecheck: venv
	@$(VENV)/bin/mypy controller api cli

# Two workers: every test of the real bed (QEMU, PostgreSQL, injected faults) runs in one of
# them, one at a time as before (tests/conftest.py groups them); the rest run beside them.
test: testbed venv lint typecheck
	@$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=15

clean:
	rm -rf $(VENV) .demo maintctl.db*
