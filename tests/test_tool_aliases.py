"""tools/*.py, the first layout's programs, are aliases of the package's commands: each names a command
that exists, and the first layout's programs (tokenize_videos, inspect_shards, export_weights, sample) run from
a checkout as they did."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALIASES = sorted(p for p in (ROOT / "tools").glob("*.py") if not p.name.startswith("_"))
STABLE = ["tokenize_videos", "inspect_shards", "export_weights", "sample"]


def aliased_module(alias: Path) -> str:
    calls = [node for node in ast.walk(ast.parse(alias.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "run"]
    assert len(calls) == 1, alias
    return calls[0].args[0].value


def test_every_alias_names_a_package_command():
    assert {p.stem for p in ALIASES} >= set(STABLE)
    scripts = (ROOT / "pyproject.toml").read_text()
    for alias in ALIASES:
        module = aliased_module(alias)
        assert callable(importlib.import_module(module).main), alias
        assert f'"{module}:main"' in scripts, f"{alias.name} aliases {module}, which is no nbp-* command"


@pytest.mark.parametrize("name", STABLE)
def test_stable_programs_run_from_the_checkout(name, tmp_path):
    alias = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    command = subprocess.run([sys.executable, "-m", aliased_module(ROOT / "tools" / f"{name}.py"), "--help"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alias.returncode == 0 == command.returncode, alias.stderr[-2000:]
    # the same program: the same help after the usage lines (argparse wraps them around the program's name)
    assert alias.stdout.split("\n\n", 1)[1] == command.stdout.split("\n\n", 1)[1]
    assert len(alias.stdout) > 200
