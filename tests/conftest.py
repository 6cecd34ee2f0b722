"""Shared test set-up: CPU DeepSpeed by default, GPU tests skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# DeepSpeed picks its accelerator at import: tests run it on CPU with gloo unless told otherwise.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU communication extension on first use into TORCH_EXTENSIONS_DIR; one folder per
# environment, so checkouts with different venvs side by side do not rebuild it for each other
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(autouse=True)
def restore_environment():
    """A test that runs a trainer in this process leaves the launcher's variables (RANK, WORLD_SIZE, ...) in
    os.environ; later tests, and the Slurm jobs they submit, must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def kill_leftover_launches():
    """A test that fails while a training launch runs must not leave it running (and holding the CPUs)."""
    yield
    from train_helpers import kill_leftover_launches

    kill_leftover_launches()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """Slurm's programs on PATH: installed with apt-get on first use where this process may (root), as the Slurm
    cluster tests install them; skipped, naming the packages, elsewhere."""
    from tests.slurm_cluster import ensure_installed

    ensure_installed()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, slurm_installed):
    """One throw-away one-node Slurm cluster (tests/slurm_cluster.py) for every test of the session that submits
    jobs: starting one takes seconds, and two at once would clash over the machine's CPUs."""
    from tests.slurm_cluster import SlurmCluster

    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
