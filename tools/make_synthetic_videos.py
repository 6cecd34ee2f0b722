"""Alias of `nbp-make-synthetic-videos` (nbp_ds/cli/make_synthetic_videos.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.make_synthetic_videos")
