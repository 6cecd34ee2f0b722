"""Alias of `nbp-check-consistency` (nbp_ds/cli/check_consistency.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.check_consistency")
