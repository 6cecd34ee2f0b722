"""The transformer's DeepSpeed trainer: DeepSpeed configs, the engine, the loop, its hooks, its saved state, the
moving average, validation and export (the shared runtime it stands on is nbp_ds.runtime)."""
