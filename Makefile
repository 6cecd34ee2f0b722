# The two commands of the README: `make quickstart` and `make test`.
PY := .venv/bin/python

.PHONY: setup quickstart test test-fast lint

setup:
	bash scripts/setup_env.sh

quickstart: setup
	DS_ACCELERATOR=cpu $(PY) -m nbp_ds.cli.quickstart

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu"

test-fast: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu and not slow and not slurm"

lint: setup
	$(PY) -m ruff check nbp_ds tools tests
