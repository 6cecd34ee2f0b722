"""Kept for hooks written against their first place (``train.hooks=module:Class`` subclasses of
nbp_ds.train.hooks.TrainerHooks): the hook seam lives in nbp_ds.runtime.hooks, the same classes."""

from nbp_ds.runtime.hooks import HookChain, TrainerHooks, load_hooks

__all__ = ["HookChain", "TrainerHooks", "load_hooks"]
