"""Reading the authors' PyTorch files with as little trust as each one needs.

``torch.load(weights_only=True)`` reads tensors and plain containers and runs no code from the file. A
file that pickles other Python objects (a Lightning ``.ckpt`` stores its hyper-parameters that way) can
only be read in full with ``weights_only=False``, which executes whatever the file says: that is the
user's explicit choice (``trust_pickle`` / ``--trust-pickle``), never a fallback.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from nbp_ds.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)


class ConversionError(UsageError, ValueError):
    """An argument of a conversion that cannot work (a missing sentencepiece model, class list, kind); the
    message names it."""

# plain attribute bags whose unpickling runs no code: the hyper-parameters of the released checkpoints
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def read_torch_file(path: str | Path, trust_pickle: bool = False, safe_globals: Iterable[type] = SAFE_GLOBALS,
                    how_to_trust: str = "pass --trust-pickle") -> Any:
    """``torch.load`` a file onto the CPU: with ``weights_only=True`` (plus ``safe_globals``), and with
    ``weights_only=False`` only when the file demands it and ``trust_pickle`` is set (``how_to_trust`` ends
    the refusal's message)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if blocked is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refuses it because it pickles the Python object "
                f"{blocked.group(1)}; reading it anyway (weights_only=False) runs code stored in the file. If you "
                f"trust the file (the authors' release), {how_to_trust}") from exc
    except (RuntimeError, KeyError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
    log.warning("%s: reading with torch.load(weights_only=False) because trust_pickle was given: the file's pickle "
                "can run code; do this only for files you trust", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{path}: its pickle needs the Python module {exc.name!r}, which is not installed "
                              f"here") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_matching_state(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse ``state`` unless it has exactly the expected keys and shapes, naming what differs."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
             for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k])]
    problems = [f"{label} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if items]
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
