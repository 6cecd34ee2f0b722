"""Alias of `nbp-tokenize` (nbp_ds/cli/tokenize.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.tokenize")
