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

# The quick tests run on one worker per CPU core (at most 4; one file per worker, so a file's shared fixtures are
# built once); then, one at a time, the tests that start several processes of their own (slow: multi-process
# DeepSpeed; slurm: a cluster) or time a second or two (timing). Both parts run even when the first fails.
PYTEST := DS_ACCELERATOR=cpu $(PY) -m pytest
PARALLEL := -n auto --maxprocesses 4 --dist loadfile

test: setup
	$(PYTEST) $(PARALLEL) -m "not gpu and not slow and not slurm and not timing"; quick=$$?; \
	$(PYTEST) -m "not gpu and (slow or slurm or timing)" && exit $$quick

test-fast: setup
	$(PYTEST) $(PARALLEL) -m "not gpu and not slow and not slurm and not timing"; quick=$$?; \
	$(PYTEST) -m "not gpu and not slow and not slurm and timing" && exit $$quick

lint: setup
	$(PY) -m ruff check nbp_ds tests tools

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m nbp_ds.cli.gpu_check
