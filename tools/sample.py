"""Alias of `nbp-sample` (nbp_ds/cli/sample.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.sample")
