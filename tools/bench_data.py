"""Alias of `nbp-bench-data` (nbp_ds/cli/bench_data.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.bench_data")
