"""Alias of `nbp-eval-fvd` (nbp_ds/cli/eval_fvd.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.eval_fvd")
