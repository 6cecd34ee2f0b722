"""The programs in tools/ are aliases of the package's commands (`nbp-*`, code in nbp_ds/cli/), kept so that
scripts written for the first layout (`python tools/sample.py ...`, the stable surface of DESIGN.md) keep
working. New scripts should call the `nbp-*` commands, which an installed copy has without a checkout."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def run(module: str) -> None:
    """Run ``module``'s ``main()`` as this program, with this program's arguments."""
    checkout = str(Path(__file__).resolve().parents[1])
    if checkout not in sys.path:  # a checkout works without installing the package, as it did
        sys.path.insert(0, checkout)
    sys.exit(importlib.import_module(module).main())
