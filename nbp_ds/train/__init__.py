"""The transformer's DeepSpeed trainer: DeepSpeed configs, the global batch, what a run folder holds (one
experiment, the weights' meaning), the engine, the loop, its hooks, its saved state, the moving average,
validation and export (one file or shards) (the shared runtime it stands on is nbp_ds.runtime)."""
