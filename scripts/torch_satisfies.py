"""Exit 0 when the installed torch satisfies nbp_ds' requirement (pyproject.toml), 1 otherwise (or none)."""

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement  # pip is in every venv; packaging may not be

deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
requirement = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
try:
    installed = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if requirement.specifier.contains(installed.split("+")[0], prereleases=True) else 1)
