"""Alias of `nbp-inspect-shards` (nbp_ds/cli/inspect_shards.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.inspect_shards")
