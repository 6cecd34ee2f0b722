"""Alias of `nbp-train-tokenizer` (nbp_ds/cli/train_tokenizer.py); see tools/_alias.py."""

from _alias import run

run("nbp_ds.cli.train_tokenizer")
