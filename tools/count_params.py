"""Alias of `nbp-count-params` (nbp_ds/cli/count_params.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.count_params")
