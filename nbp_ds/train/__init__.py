"""The transformer's DeepSpeed trainer: DeepSpeed configs, the global batch, the engine, the loop, its saved
state, validation and train.init_from. It stands on the shared runtime (nbp_ds.runtime: checkpoints, the EMA, the
hooks, the saved-parts protocol) and on nbp_ds.weights (the export format, a run's identity); nothing but the
programs (nbp_ds.cli) imports it. export and hooks here are the first paths of nbp_ds.weights.export and
nbp_ds.runtime.hooks, kept for code that imports them."""
