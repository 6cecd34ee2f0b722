"""Shared test set-up: CPU DeepSpeed by default, GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

# DeepSpeed picks its accelerator at import: tests run it on CPU with gloo unless told otherwise.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
