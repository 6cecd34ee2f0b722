"""Flags that more than one program takes, defined once: each value is checked as it is parsed and a bad one is
refused by the flag's name (exit 2), whichever program was given it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from nbp_ds.eval.synthetic import SIZE_LIMITS, SIZE_RANGE, check_object_size
from nbp_ds.generate.draw import QUICKSTART_SAMPLING


class CheckedValue(argparse.Action):
    """Stores ``check(value)``; a ValueError from ``check`` becomes the parser's error, its message as it is."""

    def __init__(self, option_strings: Sequence[str], dest: str, check: Callable[[Any], Any], **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, self.check(values))
        except ValueError as exc:
            parser.error(str(exc))


def _top_k(value: int) -> int:
    if value < 1:
        raise ValueError(f"--top-k must be >= 1, got {value}")
    return value


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {value:g}")
    return value


def _object_size(value: list[float]) -> tuple[float, float]:
    try:
        return check_object_size(value)
    except ValueError as exc:
        raise ValueError(f"--object-size: {exc}") from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--top-k, --top-p and --cfg-scale, with the quickstart's sampling (QUICKSTART_SAMPLING) as their defaults."""
    parser.add_argument("--top-k", type=int, default=QUICKSTART_SAMPLING["top_k"], action=CheckedValue, check=_top_k,
                        help="sample each token from its k likeliest codes only (default: no such limit)")
    parser.add_argument("--top-p", type=float, default=QUICKSTART_SAMPLING["top_p"], action=CheckedValue,
                        check=_top_p,
                        help=f"sample each token from its likeliest codes holding this share of the probability "
                             f"(default {QUICKSTART_SAMPLING['top_p']:g}, the quickstart's: shape and colour kept "
                             f"more often than with top-k 4, docs/quality.md; 1 = off)")
    parser.add_argument("--cfg-scale", type=float, default=QUICKSTART_SAMPLING["cfg_scale"],
                        help=f"classifier-free guidance of the samples (default "
                             f"{QUICKSTART_SAMPLING['cfg_scale']:g}, the quickstart's; 1 = off)")


def add_object_size_argument(parser: argparse.ArgumentParser) -> None:
    """--object-size MIN MAX: the synthetic objects' side as fractions of the frame's (nbp_ds.eval.synthetic)."""
    parser.add_argument("--object-size", type=float, nargs=2, default=SIZE_RANGE, metavar=("MIN", "MAX"),
                        action=CheckedValue, check=_object_size,
                        help=f"each object's side, drawn between these fractions of the frame's side (default "
                             f"{SIZE_RANGE[0]:g} {SIZE_RANGE[1]:g}, the quickstart's: 3-4 tokens a side, where "
                             f"0.3 0.4 lost shape and colour more often, docs/quality.md; allowed "
                             f"{SIZE_LIMITS[0]:g} to {SIZE_LIMITS[1]:g})")
