"""The programs in tools/ are aliases of the package's commands (`nbp-*`, code in nbp_ds/cli/), kept so that
scripts written for the first layout (`python tools/sample.py ...`, the programs the project first documented)
keep working. New scripts should call the `nbp-*` commands, which an installed copy has without a checkout."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def run(module: str) -> None:
    """Run ``module`` as this program, with this program's arguments, exactly as ``python -m module`` would.

    The command's module becomes the main module while it runs: worker processes started with ``spawn`` import
    the main module again, and they must import the command (whose work is under ``if __name__ ==
    "__main__"``), never this alias, which would run the whole command again in every worker."""
    checkout = str(Path(__file__).resolve().parents[1])
    if checkout not in sys.path:  # a checkout works without installing the package, as it did
        sys.path.insert(0, checkout)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
