# The two commands of the README: `make quickstart` and `make test`.
PY := .venv/bin/python

# On a GPU machine: its own python3 (with its CUDA torch) unless a .venv exists; no `setup` first, which
# would install the CPU torch. Missing packages travel as wheels: scripts/gpu_wheels.sh.
GPU_PY := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: setup quickstart test test-fast lint gpu-check

setup:
	bash scripts/setup_env.sh

quickstart: setup
	DS_ACCELERATOR=cpu $(PY) -m nbp_ds.cli.quickstart

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu"

test-fast: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu and not slow and not slurm"

lint: setup
	$(PY) -m ruff check nbp_ds tests tools

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m nbp_ds.cli.gpu_check
