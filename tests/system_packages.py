"""Debian packages a test needs, installed with apt-get on first use when this process is root (a CI machine: a
fresh clone, `make test` as root), else the test is skipped naming what to install. What the Slurm tests
(slurm-wlm, munge), scontrol's host lists and the browser test (Chromium) use."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def ensure_packages(packages: tuple[str, ...], present: Callable[[], bool], what: str) -> None:
    """Install ``packages`` with apt-get unless ``present()`` already holds; skip the calling test, saying why,
    where that cannot be done (not root, no apt-get, the install failed) or did not make ``present()`` hold."""
    if present():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{what} is not installed and cannot be installed here (needs root and apt-get): "
                    f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"installing {' '.join(packages)} failed: {exc}")
        if done.returncode != 0:
            pytest.skip(f"installing {' '.join(packages)} failed ({' '.join(cmd)}): {done.stderr[-2000:]}")
    if not present():
        pytest.skip(f"apt-get installed {' '.join(packages)} but {what} is still not there")


def ensure_programs(programs: tuple[str, ...], packages: tuple[str, ...], what: str) -> None:
    """``ensure_packages`` for packages that put ``programs`` on PATH."""
    ensure_packages(packages, lambda: all(shutil.which(p) for p in programs), what)
