"""Alias of `nbp-quickstart` (nbp_ds/cli/quickstart.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.quickstart")
