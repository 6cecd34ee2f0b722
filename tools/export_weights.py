"""Alias of `nbp-export` (nbp_ds/cli/export.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.export")
