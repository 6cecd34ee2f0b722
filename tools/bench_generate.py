"""Alias of `nbp-bench-generate` (nbp_ds/cli/bench_generate.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.bench_generate")
