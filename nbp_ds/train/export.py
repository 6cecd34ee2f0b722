"""Kept for code that imports the export from its first place: it lives in nbp_ds.weights.export."""

from nbp_ds.weights.export import consolidate, export, load_exported, save_export

__all__ = ["consolidate", "export", "load_exported", "save_export"]
