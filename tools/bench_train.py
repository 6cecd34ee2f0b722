"""Alias of `nbp-bench-train` (nbp_ds/cli/bench_train.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.bench_train")
