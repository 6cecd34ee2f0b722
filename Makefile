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

# $(call in_two_parts,MARKERS): the tests MARKERS selects, most on one worker per CPU core (at most 4; one file per
# worker, so a file's shared fixtures are built once), then, one at a time, those that must have the machine to
# themselves: the Slurm ones (one cluster at a time) and the timing ones (wall-clock bounds). Both parts run even
# when the first fails.
PYTEST := DS_ACCELERATOR=cpu $(PY) -m pytest
in_two_parts = $(PYTEST) -n auto --maxprocesses 4 --dist loadfile -m "$(1) and not slurm and not timing"; \
	first=$$?; $(PYTEST) -m "$(1) and (slurm or timing)" && exit $$first

test: setup
	$(call in_two_parts,not gpu)

test-fast: setup
	$(call in_two_parts,not gpu and not slow and not slurm)

lint: setup
	$(PY) -m ruff check nbp_ds tests tools

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m nbp_ds.cli.gpu_check
